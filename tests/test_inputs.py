"""Features always match their inputs: stale rows are found and recomputed, one store holds several
corpora, and extract logs progress off a terminal. Real MELD text, real RAVDESS speech, real MiniLM
and Whisper, real LanceDB on temp folders."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.inputs import DIGEST_COLUMN
from conftest import write_csv

runner = CliRunner()


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


def meld_rows(meld_dir: Path, n: int = 40) -> list[dict]:
    """The first ``n`` turns of MELD train dialogues in order as manifest rows, the last quarter of the
    dialogues as dev."""
    dialogues: dict[str, list[dict]] = defaultdict(list)
    with open(meld_dir / "train_sent_emo.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dialogues[row["Dialogue_ID"]].append(row)
    rows = []
    for d in sorted(dialogues, key=int):
        for turn, row in enumerate(sorted(dialogues[d], key=lambda r: int(r["Utterance_ID"]))):
            rows.append({"dialogue_id": d, "turn": turn, "speaker": row["Speaker"], "text": row["Utterance"],
                         "label": row["Emotion"], "split": "train", "audio": "", "start": "", "end": ""})
        if len(rows) >= n:
            break
    rows = rows[:n]
    last = {r["dialogue_id"] for r in rows[-n // 4:]}
    for r in rows:
        r["split"] = "dev" if r["dialogue_id"] in last else "train"
    return rows


def counts(line_output: str, feature: str) -> str:
    """The summary line of ``feature`` (``text/``, ``audio/``) in an extract output."""
    return next(line for line in line_output.splitlines() if line.startswith(feature))


def vectors(store: Store, modality: str) -> dict[str, np.ndarray]:
    table = store.read_features(store.feature_set(modality), ["uid", "vector"])
    return {u: np.asarray(v, dtype=np.float32) for u, v in zip(table["uid"].to_pylist(), table["vector"].to_pylist())}


def test_changed_text_media_and_span_are_recomputed_and_match_a_fresh_store(tmp_path, meld_dir, ravdess_dir, models_cache):
    wavs = sorted((ravdess_dir / "audio").glob("*.wav"))
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = meld_rows(meld_dir)
    for i in range(4):  # four utterances with speech, each its own file
        shutil.copy(wavs[i], clips / f"c{i}.wav")
        rows[i]["audio"] = str(clips / f"c{i}.wav")
    rows[1]["start"], rows[1]["end"] = "0.5", "2.5"
    manifest = write_csv(tmp_path / "base.csv", rows)
    store_path = str(tmp_path / "store")
    cli("ingest", "manifest", str(manifest), "--store", store_path)
    out = cli("extract", "--modality", "audio", "--store", store_path) + cli("extract", "--modality", "text", "--store", store_path)
    assert "4 extracted" in counts(out, "audio/") and "40 extracted" in counts(out, "text/")
    store = Store(store_path)
    before = {m: vectors(store, m) for m in ("text", "audio")}

    # One text fixed, one clip replaced by other bytes at the same path, one span moved.
    uid = {i: f"{rows[i]['split']}/{rows[i]['dialogue_id']}_{rows[i]['turn']}" for i in range(len(rows))}
    rows[10]["text"] = "I never said that, and you know it."
    shutil.copy(wavs[6], clips / "c0.wav")
    rows[1]["start"], rows[1]["end"] = "0.3", "2.0"
    write_csv(manifest, rows)
    assert "0 new, 3 updated, 37 unchanged" in cli("ingest", "manifest", str(manifest), "--store", store_path)

    info = json.loads(cli("store", "info", "--json", "--store", store_path))["features"]
    by_modality = {key.split("/")[0]: f for key, f in info.items()}
    assert (by_modality["text"]["stale"], by_modality["audio"]["stale"]) == (1, 2)
    assert by_modality["text"]["unverified"] == by_modality["audio"]["unverified"] == 0
    assert "stale rows" in cli("store", "info", "--store", store_path)
    refused = cli("baseline", "--store", store_path, "--run-dir", str(tmp_path / "run"), code=1)
    assert "were computed from inputs that have changed since" in refused and "bemerc extract --modality" in refused
    assert len(refused.strip().splitlines()) == 1

    out = cli("extract", "--modality", "all", "--store", store_path)
    assert re.search(r"audio/\S+: 0 extracted, 2 stale, re-extracted, 2 already stored, 0 failed", out), out
    assert re.search(r"text/\S+: 0 extracted, 1 stale, re-extracted, 39 already stored, 0 failed", out), out
    after = {m: vectors(store, m) for m in ("text", "audio")}
    changed = {m: {u for u in after[m] if not np.array_equal(after[m][u], before[m][u])} for m in after}
    assert changed == {"text": {uid[10]}, "audio": {uid[0], uid[1]}}
    info = json.loads(cli("store", "info", "--json", "--store", store_path))["features"]
    assert all(f["stale"] == 0 for f in info.values())
    # the re-run answers from what the run remembered, and says the same
    rerun = cli("extract", "--modality", "all", "--store", store_path)
    assert "stale" not in rerun and "0 extracted, 4 already stored" in rerun and "0 extracted, 40 already stored" in rerun

    fresh_path = str(tmp_path / "fresh")
    cli("ingest", "manifest", str(manifest), "--store", fresh_path)
    cli("extract", "--modality", "all", "--store", fresh_path)
    fresh = {m: vectors(Store(fresh_path), m) for m in ("text", "audio")}
    for m in fresh:
        assert fresh[m].keys() == after[m].keys()
        if Store(fresh_path).feature_set(m).config.get("precision") == "bf16":
            # bf16 (auto on a CPU with bf16 units): a vector depends on its batch's padding to bf16's
            # rounding, so a row re-extracted alone matches the fresh store's to that rounding
            cosine = min(float(fresh[m][u] @ after[m][u] / np.linalg.norm(fresh[m][u]) / np.linalg.norm(after[m][u])) for u in fresh[m])
            assert cosine > 0.999, m
        else:
            assert max(float(np.abs(fresh[m][u] - after[m][u]).max()) for u in fresh[m]) < 1e-4, m


def test_a_store_from_before_input_digests_is_reported_then_checked(tmp_path, meld_dir, models_cache, caplog):
    from bemerc.train.tensors import load_corpus

    manifest = write_csv(tmp_path / "m.csv", meld_rows(meld_dir, 16))
    store_path = str(tmp_path / "store")
    cli("ingest", "manifest", str(manifest), "--store", store_path)
    cli("extract", "--modality", "text", "--store", store_path)
    store = Store(store_path)
    fs = store.feature_set("text")
    store.table(fs.table_name).drop_columns([DIGEST_COLUMN])  # the table as bemerc wrote it before digests
    info = json.loads(cli("store", "info", "--json", "--store", store_path))["features"]
    assert [(f["stale"], f["unverified"]) for f in info.values()] == [(0, 16)]
    with caplog.at_level("WARNING"):
        corpus = load_corpus(store, ["text"])
    assert corpus.modalities["text"].present.all() and "16 row(s) of feature set" in caplog.text
    out = cli("extract", "--modality", "text", "--store", store_path)
    assert "0 extracted, 16 stale, re-extracted (16 without an input digest), 0 already stored" in out
    info = json.loads(cli("store", "info", "--json", "--store", store_path))["features"]
    assert [(f["rows"], f["stale"], f["unverified"]) for f in info.values()] == [(16, 0, 0)]


def test_one_store_holds_several_corpora_and_a_clash_is_one_line(tmp_path, meld_dir):
    base = meld_rows(meld_dir)
    write_csv(tmp_path / "base.csv", base)
    other_rows = [{**r, "text": f"other corpus line {i}"} for i, r in enumerate(base)]  # same dialogue ids and turns
    other = write_csv(tmp_path / "other.csv", other_rows)
    store_path = str(tmp_path / "store")
    assert "40 new, 0 updated, 0 unchanged" in cli("ingest", "manifest", str(tmp_path / "base.csv"), "--dataset", "base", "--store", store_path)
    store = Store(store_path)
    before = (store.version("utterances"), store.utterances().to_dicts())

    refused = cli("ingest", "manifest", str(other), "--dataset", "other", "--store", store_path, code=1).strip()
    assert len(refused.splitlines()) == 1
    assert refused.startswith(f"error: {other}: dataset 'other' would replace 40 utterance(s) of dataset 'base'")
    assert "train/0_0" in refused and "--dataset base" in refused
    assert (store.version("utterances"), store.utterances().to_dicts()) == before

    # the same dataset again is an idempotent update; a changed row is one update
    assert "0 new, 0 updated, 40 unchanged" in cli("ingest", "manifest", str(tmp_path / "base.csv"), "--dataset", "base", "--store", store_path)
    base[3]["text"] = "A corrected line."
    write_csv(tmp_path / "base.csv", base)
    assert "0 new, 1 updated, 39 unchanged" in cli("ingest", "manifest", str(tmp_path / "base.csv"), "--dataset", "base", "--store", store_path)

    # with distinct dialogue ids the second corpus sits beside the first
    write_csv(other, [{**r, "dialogue_id": f"o{r['dialogue_id']}"} for r in other_rows])
    assert "40 new, 0 updated, 0 unchanged" in cli("ingest", "manifest", str(other), "--dataset", "other", "--store", store_path)
    assert store.utterances(dataset="base").height == store.utterances(dataset="other").height == 40
    assert "A corrected line." in store.utterances(dataset="base")["text"].to_list()


def test_extract_off_a_terminal_logs_a_plain_progress_line(tmp_path, meld_dir, models_cache):
    from bemerc.extract.run import run_extractor
    from bemerc.extract.text import TextExtractor

    manifest = write_csv(tmp_path / "m.csv", meld_rows(meld_dir, 24))
    store_path = str(tmp_path / "store")
    cli("ingest", "manifest", str(manifest), "--store", store_path)
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    summary = run_extractor(Store(store_path), TextExtractor("offline", num_threads=2), batch_size=6, console=console,
                            progress_every_s=0.0)
    assert summary.done == 24
    lines = log.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["text:", f"{n}/24"] for n in (6, 12, 18, 24)]
    assert all(re.fullmatch(r"text: \d+/24  [\d.]+ items/s  \d+ s elapsed, ETA \d+ min \d\d s", line) for line in lines), lines
    # with the default interval (30 s) a short run logs its end only
    log.truncate(0), log.seek(0)
    store = Store(store_path)
    store.delete(store.feature_set("text").table_name, "uid LIKE 'train/%'")
    n = store.count("utterances", "split = 'train'")
    run_extractor(store, TextExtractor("offline", num_threads=2), batch_size=6, console=console)
    assert [line.split()[:2] for line in log.getvalue().splitlines()] == [["text:", f"{n}/{n}"]]

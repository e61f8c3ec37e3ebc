"""Ingest real MELD CSVs, manifests and an IEMOCAP-layout tree; bad input leaves the store as it was."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from conftest import write_iemocap, write_csv
from bemerc.store import Store
from bemerc.store.ingest import IngestError, read_iemocap, read_manifest, read_meld, write_utterances

runner = CliRunner()

MELD_COUNTS = {
    "train": {"neutral": 4710, "joy": 1743, "surprise": 1205, "anger": 1109, "sadness": 683, "disgust": 271, "fear": 268},
    "dev": {"neutral": 470, "joy": 163, "surprise": 150, "anger": 153, "sadness": 111, "disgust": 22, "fear": 40},
}


@pytest.fixture(scope="module")
def meld_store(tmp_path_factory, meld_dir) -> Store:
    path = tmp_path_factory.mktemp("meld") / "store"
    result = runner.invoke(app, ["ingest", "meld", str(meld_dir), "--store", str(path)])
    assert result.exit_code == 0, result.output
    return Store(path)


def test_meld_counts_match_the_dataset_readme(meld_store):
    utt = meld_store.utterances()
    assert utt.height == 9989 + 1109
    for split, expected in MELD_COUNTS.items():
        part = utt.filter(pl.col("split") == split)
        assert part["dialogue_id"].n_unique() == {"train": 1038, "dev": 114}[split]
        assert dict(Counter(part["label"].to_list())) == expected
    assert utt["uid"].n_unique() == utt.height
    assert "60" not in utt.filter(pl.col("split") == "train")["dialogue_id"].to_list()


def test_meld_turns_are_contiguous_in_dialogue_order(meld_store, meld_dir):
    utt = meld_store.utterances()
    per_dialogue = utt.group_by(["split", "dialogue_id"]).agg(pl.col("turn").sort(), pl.len().alias("n"))
    for turns, n in zip(per_dialogue["turn"].to_list(), per_dialogue["n"].to_list()):
        assert turns == list(range(n))
    # a dialogue with gaps in Utterance_ID keeps the order of the ids
    with open(meld_dir / "train_sent_emo.csv", encoding="utf-8") as fh:
        ids: dict[str, list[int]] = {}
        for row in csv.DictReader(fh):
            ids.setdefault(row["Dialogue_ID"], []).append(int(row["Utterance_ID"]))
    gappy = next(d for d, u in ids.items() if sorted(u) != list(range(len(u))))
    rows = utt.filter((pl.col("split") == "train") & (pl.col("dialogue_id") == gappy)).sort("turn")
    assert [int(u.split("_utt")[1]) for u in rows["uid"]] == sorted(ids[gappy])


def test_reingest_changes_nothing(meld_store, meld_dir):
    before = meld_store.version("utterances")
    result = runner.invoke(app, ["ingest", "meld", str(meld_dir), "--store", str(meld_store.path)])
    assert result.exit_code == 0
    assert "0 new, 0 updated, 11,098 unchanged" in result.output
    assert meld_store.version("utterances") == before


def test_store_info_json(meld_store):
    result = runner.invoke(app, ["store", "info", "--json", "--store", str(meld_store.path)])
    data = json.loads(result.output)
    assert data["tables"]["utterances"]["rows"] == 11098
    assert data["tables"]["utterances"]["version"] >= 1


def test_meld_links_clips_and_reports_missing_ones(tmp_path, meld_dir):
    root = tmp_path / "MELD"
    (root / "data" / "MELD").mkdir(parents=True)
    rows = list(csv.DictReader(open(meld_dir / "dev_sent_emo.csv", encoding="utf-8")))[:12]
    with open(root / "data" / "MELD" / "dev_sent_emo.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    clips = root / "dev_splits_complete"
    clips.mkdir()
    video = next((meld_dir.parent / "ravdess" / "video").glob("*.mp4"))
    for r in rows[:-1]:  # the last clip is missing, as two are in the real release
        shutil.copy(video, clips / f"dia{r['Dialogue_ID']}_utt{r['Utterance_ID']}.mp4")
    report = read_meld(root)
    linked = [r for r in report.rows if r["video_path"]]
    assert len(linked) == 11 and len(report.missing_media) == 1
    assert report.missing_media[0] == f"dev/dia{rows[-1]['Dialogue_ID']}_utt{rows[-1]['Utterance_ID']}"


def _manifest_rows(ravdess_dir: Path) -> list[dict]:
    wavs = sorted((ravdess_dir / "audio").glob("*.wav"))
    return [
        {"dialogue_id": "d1", "turn": 0, "speaker": "A", "text": "Kids are talking by the door.", "label": "neutral",
         "split": "train", "video": str(next((ravdess_dir / "video").glob("*.mp4"))), "audio": "", "start": "", "end": ""},
        {"dialogue_id": "d1", "turn": 1, "speaker": "B", "text": "Are they?", "label": "surprise",
         "split": "train", "video": "", "audio": str(wavs[7]), "start": "0.5", "end": "2.5"},
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_resolve_relative_media(tmp_path, ravdess_dir, fmt):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(sorted((ravdess_dir / "audio").glob("*.wav"))[3], media / "sad.wav")
    rows = [{"dialogue_id": 7, "turn": t, "speaker": "A", "text": f"line {t}", "label": "sadness", "split": "dev",
             "audio": "media/sad.wav"} for t in range(2)]
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        pl.DataFrame(rows).write_parquet(path)
    report = read_manifest(path)
    assert [r["uid"] for r in report.rows] == ["dev/7_0", "dev/7_1"]
    assert report.rows[0]["audio_path"] == str((media / "sad.wav").resolve())


def test_manifest_ingest_checksums_media(tmp_path, ravdess_dir):
    path = write_csv(tmp_path / "m.csv", _manifest_rows(ravdess_dir))
    store = tmp_path / "store"
    result = runner.invoke(app, ["ingest", "manifest", str(path), "--store", str(store)])
    assert result.exit_code == 0, result.output
    utt = Store(store).utterances()
    assert utt["media_sha256"].null_count() == 0 and utt["media_sha256"].n_unique() == 2
    assert utt.filter(pl.col("uid") == "train/d1_1")["start_s"].item() == 0.5


BAD_CASES = {
    "missing column": (lambda rows: [{k: v for k, v in r.items() if k != "turn"} for r in rows], "missing column(s) turn"),
    "unknown label": (lambda rows: [rows[0], {**rows[1], "label": "grumpy"}], "row 3: unknown label 'grumpy'"),
    "duplicate uid": (lambda rows: [rows[0], {**rows[1], "turn": 0}], "row 3: duplicate uid 'train/d1_0'"),
    "missing media": (lambda rows: [rows[0], {**rows[1], "audio": "nowhere.wav"}], "row 3: audio file not found"),
    "bad number": (lambda rows: [rows[0], {**rows[1], "start": "soon"}], "row 3: column 'start' must be a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_manifest_is_one_line_and_store_is_unchanged(tmp_path, ravdess_dir, case):
    store_path = tmp_path / "store"
    good = write_csv(tmp_path / "good.csv", _manifest_rows(ravdess_dir))
    assert runner.invoke(app, ["ingest", "manifest", str(good), "--store", str(store_path)]).exit_code == 0
    before = (Store(store_path).version("utterances"), Store(store_path).utterances().to_dicts())
    mutate, message = BAD_CASES[case]
    bad = write_csv(tmp_path / "bad.csv", mutate(_manifest_rows(ravdess_dir)))
    result = runner.invoke(app, ["ingest", "manifest", str(bad), "--store", str(store_path)])
    assert result.exit_code == 1
    error = result.output.strip()
    assert "\n" not in error and str(bad) in error.replace("\n", "") and message in error
    store = Store(store_path)
    assert (store.version("utterances"), store.utterances().to_dicts()) == before


def test_wrong_encoding_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("dialogue_id,turn,text\nd,0,caf\xe9\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"latin1.csv: not UTF-8 \(byte \d+, line 2\)"):
        read_manifest(path)


def test_unreadable_meld_csv(tmp_path):
    (tmp_path / "dev_sent_emo.csv").write_text("Utterance,Speaker\nhi,Joey\n")
    with pytest.raises(IngestError, match="dev_sent_emo.csv: missing column"):
        read_meld(tmp_path)


def test_iemocap_layout(tmp_path, ravdess_dir):
    write_iemocap(tmp_path / "IEMOCAP_full_release", sorted((ravdess_dir / "audio").glob("*.wav"))[0])
    report = read_iemocap(tmp_path / "IEMOCAP_full_release")
    assert report.skipped == {"label xxx": 2}
    assert len(report.rows) == 6
    test_rows = [r for r in report.rows if r["split"] == "test"]
    assert {r["dialogue_id"] for r in test_rows} == {"Ses05M_script02"}
    first = next(r for r in report.rows if r["uid"].endswith("Ses01F_impro01_F000"))
    assert (first["label"], first["text"], first["turn"], first["speaker"]) == ("neutral", "Excuse me.", 0, "Ses01_F")
    assert {r["label"] for r in report.rows} == {"neutral", "frustrated", "excited"}
    store = Store(tmp_path / "store")
    assert write_utterances(store, report.rows) == (6, 0, 0)
    assert write_utterances(store, report.rows) == (0, 0, 6)

"""Property-based tests of manifest ingest (hypothesis): random rows, columns, formats, encodings and
numbers either ingest, and read back as written, or fail with one line naming the manifest (and the
row when one row is at fault), and a failed ingest leaves every table version unchanged."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bemerc.store import Store
from bemerc.store.ingest import IngestError, read_manifest, write_utterances
from bemerc.store.ingest.common import add_checksums
from bemerc.store.schema import MELD_LABELS

COLUMNS = ("dialogue_id", "turn", "speaker", "text", "label", "split", "video", "audio", "start", "end", "sentiment", "notes")
TRICKY = ["", " ", "nan", "NaN", "inf", "-inf", "-1", "0", "1.5", "1e400", "99999999999", "2147483647", "2147483648",
          "o'brien", "x' OR '1'='1", "a,b", 'say "hi"', "line\nbreak", "tab\there", "\u2028", "caf\u00e9", "\u4f60\u597d",
          "\U0001f600", "\x00", "\ud800", "train", "dev", "test", "TRAIN", "holdout", *MELD_LABELS, "grumpy",
          "speech.wav", "missing.wav", "/dev/zero", "/etc/passwd", ".", "notes.txt", "empty.wav"]
CELLS = st.one_of(
    st.none(),
    st.sampled_from(TRICKY),
    st.text(max_size=10),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
# Per column: plausible values most of the time, anything (CELLS) sometimes, so that both ingest
# and every kind of refusal are exercised.
PLAUSIBLE = {
    "dialogue_id": st.one_of(st.sampled_from(["d1", "d2", "o'brien", "x' OR '1'='1", "7"]), st.text(min_size=1, max_size=8)),
    "turn": st.one_of(st.integers(min_value=0, max_value=40), st.sampled_from(["0", "1", "2.0", " 3 ", "2147483647"])),
    "speaker": st.text(max_size=8),
    "text": st.text(max_size=20),
    "label": st.one_of(st.none(), st.sampled_from([*MELD_LABELS, "JOY", " fear "])),
    "split": st.one_of(st.none(), st.sampled_from(["train", "dev", "test", "Dev"])),
    "video": st.one_of(st.none(), st.just("speech.wav")),
    "audio": st.one_of(st.none(), st.just("speech.wav")),
    "start": st.one_of(st.none(), st.floats(min_value=0, max_value=5), st.just("0.5")),
    "end": st.one_of(st.none(), st.floats(min_value=5.5, max_value=9)),
    "sentiment": st.one_of(st.none(), st.sampled_from(["positive", "negative", "neutral"])),
    "notes": st.text(max_size=8),
}
ENCODINGS = ("utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16", "cp1252")
counter = itertools.count()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ravdess_dir) -> tuple[Path, Store]:
    """A folder with a real short wav, an empty wav and a text file, and a store holding one dialogue."""
    root = tmp_path_factory.mktemp("ingest-properties")
    wav = sorted((ravdess_dir / "audio").glob("*.wav"))[0]
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-t", "0.3", str(root / "speech.wav")], check=True)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not media\n")
    store = Store(root / "store")
    (root / "seed.csv").write_text("dialogue_id,turn,text,label\nseed,0,Hello.,joy\n")
    write_utterances(store, read_manifest(root / "seed.csv").rows)
    return root, store


def _write(path: Path, fmt: str, encoding: str, columns: list[str], rows: list[dict]) -> None:
    if fmt == "parquet":  # Parquet stores UTF-8 only: a lone surrogate cannot even be written
        data = {c: [v.encode("utf-8", "replace").decode() if isinstance(v, str) else v for v in (r.get(c) for r in rows)]
                for c in columns}
        try:
            table = pa.table(data)
        except (pa.ArrowException, OverflowError, ValueError, TypeError):  # mixed types: store them as text
            table = pa.table({c: [None if v is None else str(v) for v in values] for c, values in data.items()})
        pq.write_table(table, path)
        return
    if fmt == "jsonl":
        text = "\n".join(json.dumps({c: r.get(c) for c in columns}) for r in rows)
    else:
        lines = []

        class Sink:
            def write(self, s):
                lines.append(s)

        writer = csv.writer(Sink(), delimiter="\t" if fmt == "tsv" else ",")
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        text = "".join(lines)
    path.write_bytes(text.encode(encoding, errors="surrogatepass" if encoding.startswith("utf-8") else "replace"))


@st.composite
def manifests(draw):
    columns = draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=len(COLUMNS)))
    if draw(st.integers(0, 4)):  # most manifests have the required columns
        columns = ["dialogue_id", "turn", *[c for c in columns if c not in ("dialogue_id", "turn")]]
    hostile = draw(st.integers(0, 2)) == 0  # a third of the manifests may hold anything in any cell
    cell = {c: st.one_of(PLAUSIBLE[c], CELLS) if hostile else PLAUSIBLE[c] for c in columns}
    rows = draw(st.lists(st.fixed_dictionaries(cell), max_size=5))
    fmt = draw(st.sampled_from(["csv", "tsv", "jsonl", "parquet"]))
    encoding = draw(st.sampled_from(ENCODINGS))
    dataset = draw(st.one_of(st.none(), st.sampled_from(["o'brien ds", "x' OR '1'='1", "\ud800", "ds"]), st.text(max_size=6)))
    return columns, rows, fmt, encoding, dataset


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(manifests())
def test_a_manifest_ingests_or_fails_with_one_line_and_no_write(workspace, manifest):
    root, store = workspace
    columns, rows, fmt, encoding, dataset = manifest
    path = root / f"m{next(counter)}.{fmt}"
    _write(path, fmt, encoding, columns, rows)
    before = {name: store.version(name) for name in store.table_names()}
    try:
        report = read_manifest(path, labels="meld", dataset=dataset)
        add_checksums(report.rows)
        write_utterances(store, report.rows)
    except IngestError as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and message.startswith(f"{path.resolve()}: "), message
        assert {name: store.version(name) for name in store.table_names()} == before
        return
    stored = {r["uid"]: r for r in store.read("utterances").to_dicts()}
    for r in report.rows:
        got = stored[r["uid"]]
        assert {k: got[k] for k in r} == {k: r[k] for k in r}
        assert 0 <= got["turn"] <= 2**31 - 1
        for key in ("start_s", "end_s"):
            assert got[key] is None or (math.isfinite(got[key]) and got[key] >= 0)
        for key in ("video_path", "audio_path"):
            assert got[key] is None or Path(got[key]).name == "speech.wav"


def test_a_line_break_inside_a_quoted_csv_field_stays_in_the_field(workspace):
    root, _ = workspace
    path = root / "quoted.csv"
    path.write_text('dialogue_id,turn,text\nd,0,"first\u2028second\nthird"\nd,1,next\n', encoding="utf-8")
    report = read_manifest(path)
    assert [r["text"] for r in report.rows] == ["first\u2028second\nthird", "next"]


def test_a_field_over_the_csv_limit_is_one_line(workspace):
    root, _ = workspace
    path = root / "huge.csv"
    path.write_text("dialogue_id,turn,text\nd,0,\"" + "x" * 200_000 + "\"\n", encoding="utf-8")
    with pytest.raises(IngestError, match=r"huge.csv: row 2: a cell holds more than 131,072 characters; .* at most 5,000 characters"):
        read_manifest(path)

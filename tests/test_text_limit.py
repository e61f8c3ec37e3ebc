"""One text-length limit for every entry point (issue 30): manifests of every format and /predict
refuse a cell longer than ``MAX_TEXT_CHARS`` (store/schema.py), a manifest in one line naming the file
and the row, with the store left unchanged. Real manifests on temp dirs, real LanceDB, the real app.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.serve import create_app
from bemerc.store import Store
from bemerc.store.schema import MAX_TEXT_CHARS
from conftest import LOCAL, write_csv

runner = CliRunner()


def rows(text_of_third: str) -> list[dict]:
    return [{"dialogue_id": "d1", "turn": t, "speaker": "Ann", "text": text, "label": "joy", "split": "train"}
            for t, text in enumerate(["Hello.", "How are you?", text_of_third])]


def write(path, data: list[dict]):
    if path.suffix == ".csv":
        return write_csv(path, data)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(data), path)
    return path


# the row a person counts: CSV and JSONL by line (the header is CSV's line 1), Parquet by row
ROW_OF_THIRD = {".csv": 4, ".jsonl": 3, ".parquet": 3}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("length", [MAX_TEXT_CHARS + 1, 10_000_000])
def test_a_manifest_row_over_the_limit_is_refused_in_one_line_naming_the_row(tmp_path, suffix, length):
    store = tmp_path / "store"
    ok = write(tmp_path / f"ok{suffix}", rows("x" * MAX_TEXT_CHARS))  # at the limit: taken
    assert runner.invoke(app, ["ingest", "manifest", str(ok), "--store", str(store)]).exit_code == 0
    before = Store(store).version("utterances")

    long = write(tmp_path / f"long{suffix}", rows("x" * length))
    result = runner.invoke(app, ["ingest", "manifest", str(long), "--dataset", "ok", "--store", str(store)])
    assert result.exit_code == 1 and (result.exception is None or isinstance(result.exception, SystemExit)), result.output
    [line] = result.stderr.strip().splitlines()
    assert f"{long}: row {ROW_OF_THIRD[suffix]}:" in line, line
    assert f"at most {MAX_TEXT_CHARS:,} characters" in line and len(line) < 400, line
    assert Store(store).version("utterances") == before


def test_predict_takes_the_same_limit(tmp_path):
    store = tmp_path / "store"
    assert runner.invoke(app, ["ingest", "manifest", str(write(tmp_path / "m.csv", rows("Hi."))), "--store", str(store)]).exit_code == 0
    client = TestClient(create_app(store), base_url=LOCAL)
    long = client.post("/predict", json={"utterances": [{"text": "x" * (MAX_TEXT_CHARS + 1)}]})
    assert long.status_code == 422 and str(MAX_TEXT_CHARS) in json.dumps(long.json()), long.text
    at_limit = client.post("/predict", json={"utterances": [{"text": "x" * MAX_TEXT_CHARS}]})
    assert str(MAX_TEXT_CHARS) not in json.dumps(at_limit.json()), at_limit.text  # refused for another reason: no run

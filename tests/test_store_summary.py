"""`bemerc store info` answers from a summary cached beside the tables while they are unchanged, and
makes it again after any write."""

from __future__ import annotations

import json

import pyarrow as pa
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store import schema as S
from bemerc.store.summary import SUMMARY_FILE, cached_info, tables_state

runner = CliRunner()


def utterance(uid: str) -> dict:
    return {"uid": uid, "dataset": "demo", "split": "dev", "dialogue_id": uid.split("/")[1], "turn": 0,
            "speaker": "A", "text": "hello", "label": "joy"}


def test_info_is_cached_until_a_write(tmp_path):
    store = Store(tmp_path / "store")
    store.upsert("utterances", pa.Table.from_pylist([utterance("dev/1")], schema=S.UTTERANCES))
    calls = []

    def compute() -> dict:
        calls.append(1)
        return store.info()

    first = cached_info(store.path, compute)
    assert first["tables"]["utterances"]["rows"] == 1 and (store.path / SUMMARY_FILE).is_file()
    assert cached_info(store.path, compute) == first and len(calls) == 1  # unchanged: from the cache

    store.upsert("utterances", pa.Table.from_pylist([utterance("dev/2")], schema=S.UTTERANCES))
    again = cached_info(store.path, compute)
    assert len(calls) == 2 and again["tables"]["utterances"]["rows"] == 2
    assert again["tables"]["utterances"]["version"] > first["tables"]["utterances"]["version"]


def test_cli_info_reads_the_same_from_the_cache(tmp_path):
    store = Store(tmp_path / "store")
    store.upsert("utterances", pa.Table.from_pylist([utterance("dev/1")], schema=S.UTTERANCES))
    computed = runner.invoke(app, ["store", "info", "--json", "--store", str(store.path)])
    cached = runner.invoke(app, ["store", "info", "--json", "--store", str(store.path)])
    assert computed.exit_code == 0 and cached.output == computed.output
    assert json.loads(cached.output) == store.info()
    assert set(tables_state(store.path)) == {"utterances"}

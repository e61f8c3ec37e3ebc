"""`bemerc store check` names (and with --remove-orphans removes) what belongs to no recorded run
(issue 30, a smaller hole): a real `bemerc baseline` process killed with SIGKILL after it wrote its
run folder and its predictions, before its `runs` row, leaves both behind. Real LanceDB store on a
temp dir (cheap n-gram features of real MELD dialogues), the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.check import find_orphans, remove_orphans
from conftest import ngram_store

runner = CliRunner()

# `bemerc baseline` in its own process, killed by SIGKILL at the moment it would write its runs row
KILLED_BASELINE = """
import os, signal, sys
from bemerc.store.db import Store
upsert = Store.upsert
def upsert_then_die(self, name, rows, schema=None):
    if name == "runs":
        os.kill(os.getpid(), signal.SIGKILL)
    return upsert(self, name, rows, schema)
Store.upsert = upsert_then_die
from bemerc.cli import app
sys.argv = ["bemerc", *sys.argv[1:]]
app()
"""


def check(store: Path, *extra: str):
    return runner.invoke(app, ["store", "check", *extra, "--store", str(store)])


@pytest.fixture()
def killed(tmp_path, meld_dir) -> tuple[Path, str]:
    """(store, run id): a store with one recorded baseline run and one baseline killed before its runs row."""
    from bemerc.train.baseline import BaselineConfig, train_baseline

    store = ngram_store(tmp_path, meld_dir, n_dialogues=12)
    config = BaselineConfig(max_rounds=20, early_stopping_rounds=5, bootstrap_resamples=10, fusion_steps=3)
    train_baseline(store, feature_sets=["text"], config=config)  # recorded, in STORE/runs/ too
    proc = subprocess.run([sys.executable, "-c", KILLED_BASELINE, "baseline", "--store", str(store.path), "--feature-set",
                           "text"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    recorded = set(store.read("runs", ["run_id"])["run_id"].to_list())
    [unrecorded] = set(store.read("predictions", ["run_id"])["run_id"].to_list()) - recorded
    assert (Path(store.path) / "runs" / unrecorded / "metrics.json").is_file()
    return Path(store.path), unrecorded


def test_store_check_names_what_a_killed_baseline_left(killed):
    store, run_id = killed
    before = Store(store).count("predictions")
    result = check(store)
    assert result.exit_code == 0, result.output  # nothing is damaged: readers ignore what no run names
    assert f"predictions of run {run_id!r}" in result.output and "no `runs` row names the run" in result.output
    assert f"{store / 'runs' / run_id}: a run folder that no `runs` row names" in result.output
    assert f"`bemerc store check --remove-orphans --store {store}` removes them" in result.output
    assert "tables read whole" in result.output
    data = json.loads(check(store, "--json").output)
    assert list(data["orphans"]["predictions"]) == [run_id] and data["orphans"]["folders"] == [str(store / "runs" / run_id)]
    assert Store(store).count("predictions") == before  # checking changes nothing


def test_remove_orphans_takes_them_and_nothing_recorded(killed):
    store, run_id = killed
    runs_before = Store(store).read("runs")
    recorded = Path(runs_before["run_dir"][0])
    # a folder a writer may still record (just changed) and a stopped tune run's checkpoint folder stay
    stopped_tune = store / "runs" / "tune-20261206-000000-abcd"
    stopped_tune.mkdir()
    (stopped_tune / "checkpoint.pt").write_bytes(b"\0" * 10)
    old = time.time() - 3600
    os.utime(store / "runs" / run_id, (old, old))
    for entry in (store / "runs" / run_id).iterdir():
        os.utime(entry, (old, old))
    staging = store / "runs" / ".baseline-x.partial-1234"
    staging.mkdir()
    (staging / "model_text.ubj").write_bytes(b"cut short")  # young: left alone
    orphans = find_orphans(Store(store))
    assert set(orphans.folders) == {store / "runs" / run_id, stopped_tune, staging} and orphans.resumable == [stopped_tune]

    result = check(store, "--remove-orphans")
    assert result.exit_code == 0, result.output
    assert f"removed the predictions of run {run_id!r}" in result.output and f"removed {store / 'runs' / run_id}" in result.output
    assert f"`bemerc tune --resume --run-dir {stopped_tune}` continues it" in result.output
    assert not (store / "runs" / run_id).exists() and stopped_tune.is_dir() and staging.is_dir() and recorded.is_dir()
    after = Store(store)
    assert run_id not in set(after.read("predictions", ["run_id"])["run_id"].to_list())
    assert after.read("runs").equals(runs_before)
    assert after.count("predictions") == after.read("predictions", where=f"run_id = '{runs_before['run_id'][0]}'").height

    os.utime(staging, (old, old))
    os.utime(staging / "model_text.ubj", (old, old))
    assert remove_orphans(after, min_age_s=600)[1] == [staging]
    assert find_orphans(after).folders == [stopped_tune]

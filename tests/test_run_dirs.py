"""Run folders (issue 30): every run writer (baseline, tune, fuse, compare --out) refuses a folder that
is taken, in one line and before any work, and never writes over another run's files.

Real LanceDB stores on temp dirs (two cheap n-gram feature sets of real MELD dialogues) and the real
commands through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from conftest import ngram_store
from test_faults import one_line

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir) -> Store:
    """12 MELD dev dialogues with n-gram features and two baseline runs (seeds 0 and 1)."""
    from bemerc.train.baseline import BaselineConfig, train_baseline

    folder = tmp_path_factory.mktemp("run-dirs")
    store = ngram_store(folder, meld_dir, n_dialogues=12)
    for seed in (0, 1):
        config = BaselineConfig(max_rounds=30, early_stopping_rounds=5, bootstrap_resamples=20, fusion_steps=3, seed=seed)
        train_baseline(store, feature_sets=["text"], config=config, run_dir=folder / f"seed{seed}")
    return store


def writers(store: Store, target: Path) -> dict[str, list[str]]:
    """Each run writer's command line, writing its run (or report) into ``target``."""
    s = ["--store", str(store.path)]
    return {
        "baseline": ["baseline", *s, "--feature-set", "text", "--run-dir", str(target)],
        "baseline --seeds": ["baseline", *s, "--feature-set", "text", "--seeds", "0,1", "--run-dir", str(target)],
        "tune": ["tune", *s, "--model", str(target.parent / "no-model-needed"), "--run-dir", str(target)],
        "tune --seeds": ["tune", *s, "--model", str(target.parent / "no-model-needed"), "--seeds", "0,1", "--run-dir", str(target)],
        "fuse": ["fuse", "baseline:latest", runs(store)[0], *s, "--run-dir", str(target)],
        "compare --out": ["compare", *s, "--out", str(target)],
    }


def runs(store: Store) -> list[str]:
    return Store(store.path).read("runs", ["run_id"])["run_id"].to_list()


@pytest.mark.parametrize("writer", ["baseline", "baseline --seeds", "tune", "tune --seeds", "fuse", "compare --out"])
def test_a_run_writer_refuses_a_file_or_a_folder_holding_files_in_one_line(store, tmp_path, writer):
    before = sorted(runs(store))
    file = tmp_path / "notes.txt"
    file.write_text("not a folder")
    option = "--out" if writer.startswith("compare") else "--run-dir"
    one_line(runner.invoke(app, writers(store, file)[writer]), f"{file}: is a file", option)
    assert file.read_text() == "not a folder"

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.json").write_text('{"another run": true}')
    line = one_line(runner.invoke(app, writers(store, taken)[writer]), f"{taken}: already holds metrics.json",
                    "nothing was written", f"give {option} a new or empty folder")
    assert "never writes over" in line
    assert json.loads((taken / "metrics.json").read_text()) == {"another run": True}
    assert [p.name for p in taken.iterdir()] == ["metrics.json"]
    assert sorted(runs(store)) == before


def test_an_empty_folder_takes_a_run_and_a_report_replaces_an_earlier_report(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["baseline", "--store", str(store.path), "--feature-set", "text", "--run-dir", str(empty), "--json"])
    assert result.exit_code == 0, result.output
    assert (empty / "metrics.json").is_file() and (empty / "baseline.json").is_file()
    again = runner.invoke(app, ["baseline", "--store", str(store.path), "--feature-set", "text", "--run-dir", str(empty)])
    one_line(again, f"{empty}: already holds baseline.json")

    report = tmp_path / "report"
    for _ in range(2):  # the second compare replaces the first one's report
        shown = runner.invoke(app, ["compare", "--store", str(store.path), "--out", str(report)])
        assert shown.exit_code == 0, shown.output
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    (report / "mine.txt").write_text("a file of mine")
    one_line(runner.invoke(app, ["compare", "--store", str(store.path), "--out", str(report)]), f"{report}: already holds mine.txt")


def test_a_full_disk_leaves_no_half_written_run_folder_and_says_so_in_one_line(store, tmp_path):
    """Run folders on a full tmpfs (the store elsewhere): each writer answers the one-line "no space
    left" naming its folder, and neither the folder nor a temporary one stays behind."""
    from test_faults import tmpfs

    before = sorted(runs(store))
    with tmpfs(tmp_path / "full", "1m") as mount:
        _fill(mount)  # every block taken
        for writer in ("baseline", "fuse", "compare --out"):
            target = mount / writer.split()[0]
            line = one_line(runner.invoke(app, writers(store, target)[writer]), f"{target}: no space left on the device",
                            "free space, then run the same command again")
            assert "Traceback" not in line
            assert sorted(p.name for p in mount.iterdir()) == ["filler"], writer  # no run folder, no .partial folder
        assert sorted(runs(store)) == before


def test_a_run_the_store_cannot_record_leaves_no_run_folder(store, tmp_path):
    """The run folder is written whole, then the store records the run; when the store refuses (here
    read-only), the folder is taken back: no run folder without its `runs` row."""
    import shutil
    import subprocess

    from test_faults import tmpfs

    with tmpfs(tmp_path / "ro", "20m") as mount:
        copy = Path(shutil.copytree(store.path, mount / "store"))
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)]).returncode == 0
        elsewhere = tmp_path / "elsewhere"
        one_line(runner.invoke(app, ["baseline", "--store", str(copy), "--feature-set", "text", "--run-dir", str(elsewhere)]),
                 "read-only")
        assert not elsewhere.exists() and list(tmp_path.glob(".elsewhere.partial-*")) == []


def _fill(mount: Path) -> Path:
    """Take every free block of the tmpfs ``mount``: a file ``filler``."""
    filler = mount / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return filler


def test_tune_on_a_full_disk_says_so_in_one_line_and_keeps_a_checkpoint_to_resume_from(store, tiny_llm, tmp_path):
    """tune's own writes (checkpoint, log, adapter: torch, safetensors and Python files) on a full
    tmpfs answer the run writers' one line naming the run folder. A fresh run leaves no folder; a run
    with a checkpoint keeps it, whole, and the line says to resume, which then records the run."""
    from test_faults import tmpfs

    from bemerc.train.tune.loop import load_checkpoint

    before = sorted(runs(store))
    quick = ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--layout", "utterance", "--train-limit", "16",
             "--eval-limit", "8", "--epochs", "2", "--align-epochs", "0", "--project-epochs", "0", "--batch-size", "2", "--json"]
    with tmpfs(tmp_path / "full", "1m") as mount:
        _fill(mount)
        target = mount / "tune"
        one_line(runner.invoke(app, [*quick, "--run-dir", str(target)]), f"{target}: no space left on the device",
                 "free space, then run the same command again")
        assert sorted(p.name for p in mount.iterdir()) == ["filler"]  # no run folder, no .partial folder

    with tmpfs(tmp_path / "room", "30m") as mount:
        run_dir = mount / "run"
        stopped = runner.invoke(app, [*quick, "--run-dir", str(run_dir), "--stop-after", "1"])
        assert stopped.exit_code == 0 and json.loads(stopped.stdout).get("stopped"), stopped.stdout[-1500:]
        checkpoint = (run_dir / "checkpoint.pt").read_bytes()
        filler = _fill(mount)
        resume = ["tune", "--store", str(store.path), "--resume", "--run-dir", str(run_dir), "--json"]
        line = one_line(runner.invoke(app, resume), f"{run_dir}: no space left on the device",
                        f"free space, then continue with `bemerc tune --resume --run-dir {run_dir}`")
        assert "Traceback" not in line
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "log.jsonl"]  # no checkpoint.tmp, no half adapter
        assert (run_dir / "checkpoint.pt").read_bytes() == checkpoint and load_checkpoint(run_dir / "checkpoint.pt")["progress"]
        assert sorted(runs(store)) == before
        filler.unlink()
        done = runner.invoke(app, resume)
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["run_id"] in runs(store) and (run_dir / "metrics.json").is_file()

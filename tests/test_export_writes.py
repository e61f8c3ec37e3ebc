"""`bemerc query export` writes its file whole or not at all (issue 30, a smaller hole): a temporary
file beside the target renamed onto it, a symbolic link refused (its target untouched), the real
cause named on a full disk (a real tmpfs) or in /proc, and no 0-byte or partial file left behind.
A real store ingested from the demo manifest on a temp dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import bemerc
from bemerc.cli import app

runner = CliRunner()
MANIFEST = Path(bemerc.__file__).parent / "demo" / "dialogues.jsonl"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "store"
    result = runner.invoke(app, ["ingest", "manifest", str(MANIFEST), "--store", str(path)])
    assert result.exit_code == 0, result.output
    return path


def export(store: Path, out: Path | str, *extra: str):
    return runner.invoke(app, ["query", "export", "utterances", str(out), *extra, "--store", str(store)])


def one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


def test_export_writes_a_whole_file_with_the_usual_mode(store, tmp_path):
    out = tmp_path / "u.csv"
    out.write_text("old\n")
    assert export(store, out).exit_code == 0
    assert pl.read_csv(out).height == 51 and leftovers(tmp_path) == []
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert export(store, tmp_path / "u.parquet").exit_code == 0 and pq.read_table(tmp_path / "u.parquet").num_rows == 51


def test_a_symlinked_output_is_refused_and_its_target_untouched(store, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    link = tmp_path / "u.csv"
    link.symlink_to(target)
    one_line(export(store, link), "symbolic link", "nothing was written")
    assert target.read_text() == "keep me\n" and link.is_symlink() and leftovers(tmp_path) == []
    dangling = tmp_path / "d.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")  # a dangling link would have created its target
    one_line(export(store, dangling), "symbolic link")
    assert not (tmp_path / "nowhere.csv").exists()


def test_proc_and_a_folder_name_the_real_cause(store, tmp_path):
    line = one_line(export(store, "/proc/u.csv"), "/proc/u.csv", "cannot create a file in /proc")
    assert "None" not in line and not Path("/proc/u.csv").exists()
    one_line(export(store, tmp_path, "--format", "csv"), "is a folder")


def test_a_full_disk_is_one_line_and_leaves_no_file(store, tmp_path):
    from test_faults import tmpfs

    with tmpfs(tmp_path / "full", "64k") as mount:
        kept = mount / "kept.csv"
        kept.write_text("an earlier export\n")
        filler = mount / "filler"
        filler.write_bytes(os.urandom(max(0, shutil.disk_usage(mount).free - 2_000)))
        for name in ("u.csv", "u.parquet", "kept.csv"):
            line = one_line(export(store, mount / name), f"{mount / name}: cannot write",
                            "no space left on the device", "free space, then export again")
            assert "None" not in line
        assert sorted(p.name for p in mount.iterdir()) == ["filler", "kept.csv"]  # no 0-byte file, no partial
        assert kept.read_text() == "an earlier export\n"
        assert "it was left as it was" in one_line(export(store, kept))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

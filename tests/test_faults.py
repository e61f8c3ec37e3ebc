"""Faults of the disk and of the storage end in one line naming the path or URI and the cause, and the
store keeps what it had (issue 18): a read-only store, a full disk during extract, a store damaged
by hand, object storage that lacks the bucket, does not answer or goes away mid-extract.

Real file systems where the test may mount them (a tmpfs, remounted read-only; a 700 kB tmpfs for
the full disk; skipped where mounting is not allowed), a real S3 server (moto) behind a TCP relay
the test can cut, real LanceDB and the real MiniLM text extractor.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.cli.faults import describe
from bemerc.store import Store
from bemerc.store.check import check_store

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, list(args))


def one_line(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, meld_dir) -> Path:
    """40 MELD train rows: 7 dialogues of (up to) 6 turns, 30 train and 10 dev."""
    dialogues: dict[str, list[dict]] = {}
    with open(meld_dir / "train_sent_emo.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dialogues.setdefault(row["Dialogue_ID"], []).append(row)
    path = tmp_path_factory.mktemp("faults") / "base.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dialogue_id", "turn", "speaker", "text", "label", "split"])
        n = 0
        for d in [d for d in dialogues if len(dialogues[d]) >= 6][:7]:
            for turn, row in enumerate(dialogues[d][:6]):
                if n < 40:
                    writer.writerow([d, turn, row["Speaker"], row["Utterance"], row["Emotion"], "train" if n < 30 else "dev"])
                    n += 1
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, manifest, models_cache) -> Path:
    """The 40-row store with real MiniLM text features and a baseline run."""
    path = tmp_path_factory.mktemp("trained") / "store"
    assert cli("ingest", "manifest", str(manifest), "--store", str(path)).exit_code == 0
    assert cli("extract", "--modality", "text", "--threads", "1", "--store", str(path)).exit_code == 0
    result = cli("baseline", "--store", str(path), "--run-dir", str(path.parent / "run"))
    assert result.exit_code == 0, result.output
    return path


def versions(path: Path) -> dict[str, int]:
    store = Store(path)
    return {name: store.version(name) for name in store.table_names()}


@contextmanager
def tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_read_only_store_is_one_line_and_unchanged(trained, manifest, tmp_path):
    with tmpfs(tmp_path / "ro", "20m") as mount:
        store = Path(shutil.copytree(trained, mount / "store"))
        before = versions(store)
        changed = tmp_path / "changed" / manifest.name  # the same dataset (named after the file), one label changed
        changed.parent.mkdir()
        changed.write_text(manifest.read_text().replace(",train\n", ",train\n", 1).replace("neutral", "joy", 1))
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)]).returncode == 0
        one_line(cli("baseline", "--store", str(store)), f"{store}/runs", "read-only", "store was not changed")
        one_line(cli("baseline", "--store", str(store), "--run-dir", str(tmp_path / "elsewhere")),
                 f"{store}/.bemerc-write.lock", "read-only")
        one_line(cli("ingest", "manifest", str(changed), "--store", str(store)), str(store), "read-only")
        assert versions(store) == before and check_store(Store(store)) == []


def test_a_full_disk_during_extract_is_one_line_and_the_store_stays_consistent(manifest, tmp_path):
    with tmpfs(tmp_path / "small", "700k") as mount:
        store = mount / "store"
        assert cli("ingest", "manifest", str(manifest), "--store", str(store)).exit_code == 0
        free = shutil.disk_usage(mount).free
        filler = mount / "filler"
        filler.write_bytes(b"\0" * max(0, free - 40_000))  # 40 kB left: less than 40 MiniLM vectors
        line = one_line(cli("extract", "--modality", "text", "--threads", "1", "--store", str(store)),
                        "no space left on the device", "the store is consistent", "free space, then run the same command again")
        assert str(store) in line
        assert check_store(Store(store)) == [] and Store(store).count("utterances") == 40
        filler.unlink()
        again = cli("extract", "--modality", "text", "--threads", "1", "--store", str(store))
        assert again.exit_code == 0, again.output
        fs = Store(store).feature_set("text")
        assert Store(store).count(fs.table_name) == 40


@pytest.mark.parametrize("damage", ["utterances data deleted", "predictions file cut to 100 bytes"])
def test_a_damaged_store_is_found_by_store_check_and_every_command_points_at_it(trained, tmp_path, damage):
    store = Path(shutil.copytree(trained, tmp_path / "store"))
    if damage.startswith("utterances"):
        shutil.rmtree(store / "utterances.lance" / "data")
        table, commands = "utterances", [["baseline", "--run-dir", str(tmp_path / "r")], ["query", "show", "train/x_0"],
                                         ["extract", "--modality", "text"], ["compare"]]
    else:
        data = next((store / "predictions.lance" / "data").glob("*.lance"))
        data.write_bytes(data.read_bytes()[:100])
        uid = Store(trained).read("predictions", ["uid"])["uid"][0]
        table, commands = "predictions", [["compare"], ["query", "show", uid]]
    before = versions(store)
    result = cli("store", "check", "--store", str(store))
    assert result.exit_code == 1 and f"{store}/{table}.lance: table '{table}' cannot be read" in result.output
    assert "1 of 5 tables cannot be read" in result.stderr
    info = cli("store", "info", "--store", str(store))  # the quick look finds it too
    assert info.exit_code == 1 and f"table '{table}' cannot be read" in info.output and "bemerc store check" in info.stderr
    for command in commands:
        one_line(cli(*command, "--store", str(store)), f"{store}: the store is damaged", f"bemerc store check --store {store}")
    assert versions(store) == before
    assert cli("store", "check", "--store", str(trained)).exit_code == 0  # the original reads whole


def test_a_cut_short_newest_version_manifest_is_one_line_everywhere_and_store_check_restores_the_previous_version(trained, tmp_path):
    store = Path(shutil.copytree(trained, tmp_path / "store"))
    table = Store(store).feature_set("text").table_name
    uid = Store(store).read("utterances", ["uid"])["uid"][0]
    manifests = sorted((store / f"{table}.lance" / "_versions").glob("*.manifest"), key=lambda p: int(p.stem))
    newest = manifests[0] if int(manifests[0].stem) >= 2**63 else manifests[-1]  # Lance's newer naming counts down
    with open(newest, "r+b") as fh:
        fh.truncate(50)
    for command in (["baseline", "--run-dir", str(tmp_path / "r")], ["extract", "--modality", "text", "--threads", "1"],
                    ["query", "show", uid], ["query", "similar", uid], ["query", "export", "text", str(tmp_path / "x.csv")],
                    ["store", "info"]):
        one_line(cli(*command, "--store", str(store)), f"{store}: the store is damaged: table {table!r} cannot be opened",
                 "file size is too small", f"bemerc store check --store {store}")
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.csv").exists()

    check = cli("store", "check", "--store", str(store))
    assert check.exit_code == 1 and f"table {table!r} cannot be read: its newest version cannot be opened" in check.output
    assert f"`bemerc store check --restore --store {store}` makes version" in check.output
    restored = cli("store", "check", "--restore", "--store", str(store))
    assert restored.exit_code == 0, restored.output
    assert "is the newest again" in restored.output and f"all 5 tables read whole" in restored.output
    assert (store / f"{table}.lance" / "_damaged_versions" / newest.name).stat().st_size == 50  # kept aside, not deleted
    again = cli("extract", "--modality", "text", "--threads", "1", "--store", str(store))  # what the lost write held is computed again
    assert again.exit_code == 0, again.output
    assert Store(store).count(table) == 40 and cli("store", "check", "--store", str(store)).exit_code == 0


class Relay:
    """A TCP relay to the S3 server that the test can cut (connections refused) and restore: the
    server "goes away" while keeping what it stored."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.open = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.open = False
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns.clear()


def test_object_storage_faults_are_one_line_naming_the_uri(s3_server, s3_store, manifest, monkeypatch, models_cache):
    missing = "s3://no-such-bucket-18/store"
    one_line(cli("ingest", "manifest", str(manifest), "--store", missing), missing, "bucket 'no-such-bucket-18' does not exist")

    relay = Relay(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", relay.url)
    assert cli("ingest", "manifest", str(manifest), "--store", s3_store).exit_code == 0

    from bemerc.extract.run import run_extractor
    from bemerc.extract.text import TextExtractor

    flushed = []

    def after_batch(n: int) -> None:
        store = Store(s3_store)
        flushed.append(store.count(store.feature_sets("text")[0].table_name))
        if len(flushed) == 2:
            relay.cut()  # the server goes away mid-extract

    with pytest.raises(Exception) as raised:
        run_extractor(Store(s3_store), TextExtractor("offline", num_threads=1), batch_size=8, flush_rows=10**9,
                      flush_seconds=0, on_batch=after_batch)
    line = describe(raised.value, s3_store)
    assert line is not None and line.startswith(f"{s3_store}: cannot reach {relay.url}") and "\n" not in line
    assert "what was written before stays" in line
    one_line(cli("store", "info", "--store", s3_store), s3_store, f"cannot reach {relay.url}")

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)  # the server again: the flushed rows are there
    store = Store(s3_store)
    assert flushed[:2] == [8, 16] and store.count(store.feature_sets("text")[0].table_name) == 16

"""One writer at a time, with two real processes; readers never block."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow as pa

from bemerc.store import Store, StoreLockedError
from bemerc.store.lock import WriteLock

HOLD = """
import sys, time
from bemerc.store import Store
store = Store(sys.argv[1])
with store.lock:
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""

WRITE = """
import sys
import pyarrow as pa
from bemerc.store import Store
store = Store(sys.argv[1])
fs = store.register_feature_set("text", "probe", "h1", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
rows = pa.table({"uid": [f"u{i}" for i in range(200)], "vector": pa.array([[float(i), 1.0] for i in range(200)], pa.list_(pa.float32(), 2))})
for _ in range(5):
    store.write_features(fs, rows)
"""


def _hold_lock(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_fails_with_a_clear_message(tmp_path):
    store = Store(tmp_path, lock_timeout_s=0.5)
    holder = _hold_lock(tmp_path, 5)
    try:
        t0 = time.monotonic()
        try:
            store.upsert("runs", pa.Table.from_pylist([], schema=store.read_arrow("runs").schema))  # empty: no lock
            store.register_feature_set("text", "x", "h", {}, [pa.field("vector", pa.list_(pa.float32(), 2))])
            raise AssertionError("the second writer got the lock")
        except StoreLockedError as e:
            assert "being written by pid" in str(e) and str(tmp_path) in str(e)
        assert time.monotonic() - t0 < 3
        # readers do not block while the writer holds the lock
        assert store.table_names() == [] and store.read("utterances").height == 0
    finally:
        holder.wait()


def test_second_writer_waits_then_writes(tmp_path):
    holder = _hold_lock(tmp_path, 1.0)
    lock = WriteLock(tmp_path, timeout_s=30)
    t0 = time.monotonic()
    with lock:
        waited = time.monotonic() - t0
    holder.wait()
    assert 0.3 < waited < 10


def test_concurrent_writers_leave_no_duplicates(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITE, str(tmp_path)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = Store(tmp_path)
    uids = store.read_features("text/probe")["uid"].to_pylist()
    assert len(uids) == 200 and len(set(uids)) == 200
    assert len(store.feature_sets()) == 1

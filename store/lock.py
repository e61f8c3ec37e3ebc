"""One writer per store: an advisory file lock that a second writing process waits on, then fails.

LanceDB's ``merge_insert`` duplicates keys when two processes write the same table at once, so every
write in bemerc happens under this lock. Readers never take it and never block.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

LOCK_FILE = ".bemerc-write.lock"


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock for longer than we were willing to wait."""


class WriteLock:
    """Exclusive, re-entrant (within one process) write lock on a store folder.

    ``timeout_s`` is how long to wait for another writer (env ``BEMERC_LOCK_TIMEOUT``, default 600 s;
    0 fails at once). The lock file records the holder's pid and command for the error message. The
    OS releases the lock when the holder dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, store_path: Path, timeout_s: float | None = None):
        self.path = Path(store_path) / LOCK_FILE
        env_timeout = os.environ.get("BEMERC_LOCK_TIMEOUT")
        self.timeout_s = timeout_s if timeout_s is not None else float(env_timeout) if env_timeout else 600.0
        self._fd: int | None = None
        self._depth = 0

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLockedError(
                        f"{self.path.parent}: the store is being written by {self.holder()}; "
                        f"waited {self.timeout_s:.0f} s (set BEMERC_LOCK_TIMEOUT to wait longer)"
                    ) from None
                if not told:
                    print(f"waiting for the store's writer ({self.holder()}) to finish...", file=sys.stderr)
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:3])})".encode())
        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriteLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

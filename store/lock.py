"""One writer per store: a lock that a second writing process waits on, then fails.

LanceDB's ``merge_insert`` duplicates keys when two processes write the same table at once (on a
local disk and on object storage alike), so every write in bemerc happens under this lock. Readers
never take it and never block.

- A local store folder uses :class:`WriteLock`, an advisory file lock (``flock``) on
  ``.bemerc-write.lock``: the OS releases it when the holder dies.
- A store on object storage (``s3://``, ``gs://``, ``az://``) uses :class:`ObjectStoreLock`, a lease
  object ``.bemerc-write.lock`` beside the tables written with conditional PUTs (create only if
  absent; replace only if unchanged since read), which S3, GCS and Azure apply atomically. The holder
  renews the lease while it writes; a lease not renewed for ``lease_s`` (a dead holder) is taken over.

The same two locks, under another name, are an extraction's claim on a feature set
(``Store.extract_claim``): a second ``bemerc extract`` of the same feature set waits for the first,
then finds its rows stored instead of computing them again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_FILE = ".bemerc-write.lock"
WRITE_WORK = "writing the store"  # what the write lock guards (its messages keep their own words)


def _busy_lines(work: str) -> tuple[str, str]:
    """(refusal, waiting line) templates with ``{holder}`` for a lock that guards ``work``."""
    if work == WRITE_WORK:
        return "the store is being written by {holder}", "waiting for the store's writer ({holder}) to finish..."
    return f"{work} is being done by {{holder}}", f"waiting for {work} by {{holder}} to finish..."
CLAIM_PREFIX = ".bemerc-extract-"  # + feature table name + ".lock": the claim of one extraction (see Store.extract_claim)


class StoreLockedError(RuntimeError):
    """Another process holds the store's write lock for longer than we were willing to wait."""


def lock_timeout_s(timeout_s: float | None) -> float:
    """``timeout_s``, else env ``BEMERC_LOCK_TIMEOUT``, else 600 s."""
    env_timeout = os.environ.get("BEMERC_LOCK_TIMEOUT")
    return timeout_s if timeout_s is not None else float(env_timeout) if env_timeout else 600.0


def _holder_name() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])})"


class _Lock:
    """``with lock:`` acquires and releases."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "_Lock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class WriteLock(_Lock):
    """Exclusive, re-entrant (within one process) write lock on a store folder.

    ``timeout_s`` is how long to wait for another writer (env ``BEMERC_LOCK_TIMEOUT``, default 600 s;
    0 fails at once). The lock file records the holder's pid and command for the error message. The
    OS releases the lock when the holder dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, store_path: Path, timeout_s: float | None = None, name: str = LOCK_FILE,
                 work: str = WRITE_WORK):
        self.path = Path(store_path) / name
        self.timeout_s = lock_timeout_s(timeout_s)
        self.work = work
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
                        f"{self.path.parent}: {_busy_lines(self.work)[0].format(holder=self.holder())}; "
                        f"waited {self.timeout_s:.0f} s (set BEMERC_LOCK_TIMEOUT to wait longer)"
                    ) from None
                if not told:
                    print(_busy_lines(self.work)[1].format(holder=self.holder()), file=sys.stderr)
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


class ObjectStoreLock(_Lock):
    """Exclusive, re-entrant (within one process) write lock on a store on object storage.

    The lease object ``{store_uri}/.bemerc-write.lock`` holds JSON ``{"holder", "expires_at"}``
    (Unix seconds). Acquiring creates it with a create-only PUT (S3 ``If-None-Match: *``), or replaces
    a released or expired lease with a PUT conditional on the ETag just read (``If-Match``): of two
    processes racing for it, exactly one PUT succeeds. The holder renews the lease every
    ``lease_s / 4`` from a background thread and marks it released (``expires_at`` 0) when done.
    Clocks of the writing machines must agree to well within ``lease_s`` (NTP does). Credentials and
    endpoint come from the environment, as for LanceDB (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``; ``GOOGLE_*``, ``AZURE_*``).

    >>> with ObjectStoreLock("s3://bucket/store"):  # doctest: +SKIP
    ...     table.merge_insert("uid")...
    """

    def __init__(self, store_uri: str, timeout_s: float | None = None, lease_s: float = 60.0, name: str = LOCK_FILE,
                 work: str = WRITE_WORK):
        from bemerc.store.objects import open_object

        self.uri = f"{store_uri.rstrip('/')}/{name}"
        self.work = work
        self._store, self._key = open_object(self.uri)
        self.timeout_s = lock_timeout_s(timeout_s)
        self.lease_s = lease_s
        self._depth = 0
        self._etag: str | None = None
        self._guard = threading.Lock()  # the renewing thread and release never PUT at once
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> tuple[dict, str] | None:
        """(lease, ETag) of the lease object, or None when there is none."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self._store, self._key)
            body = bytes(result.bytes())
            etag = result.meta["e_tag"]
        except (NotFoundError, FileNotFoundError):
            return None
        try:
            return json.loads(body), etag
        except ValueError:
            return {"holder": "an unreadable lease", "expires_at": 0}, etag

    def _put(self, expires_at: float, mode: object) -> str:
        import obstore

        lease = {"holder": _holder_name(), "expires_at": expires_at}
        return obstore.put(self._store, self._key, json.dumps(lease).encode(), mode=mode)["e_tag"]

    def holder(self) -> str:
        found = self._read()
        return found[0].get("holder", "another process") if found else "nobody"

    def _try_take(self) -> tuple[bool, str]:
        """One attempt: (taken, who holds it otherwise)."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        found = self._read()
        try:
            if found is None:
                self._etag = self._put(time.time() + self.lease_s, "create")
                return True, ""
            lease, etag = found
            if float(lease.get("expires_at", 0)) < time.time():
                self._etag = self._put(time.time() + self.lease_s, {"e_tag": etag})
                return True, ""
            return False, str(lease.get("holder", "another process"))
        except (AlreadyExistsError, PreconditionError):
            return False, "another process"  # someone else won this race

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        deadline = time.monotonic() + self.timeout_s
        told = False
        while True:
            taken, holder = self._try_take()
            if taken:
                break
            if time.monotonic() >= deadline:
                raise StoreLockedError(
                    f"{self.uri}: {_busy_lines(self.work)[0].format(holder=holder)}; waited {self.timeout_s:.0f} s "
                    f"(set BEMERC_LOCK_TIMEOUT to wait longer)"
                )
            if not told:
                print(_busy_lines(self.work)[1].format(holder=holder), file=sys.stderr)
                told = True
            time.sleep(0.2)
        self._depth = 1
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name="bemerc-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        from obstore.exceptions import PreconditionError

        while not self._stop.wait(self.lease_s / 4):
            with self._guard:
                if self._stop.is_set():
                    return
                try:
                    self._etag = self._put(time.time() + self.lease_s, {"e_tag": self._etag})
                except PreconditionError:
                    print(f"{self.uri}: the write lease was taken over (this process stalled for over "
                          f"{self.lease_s:.0f} s)", file=sys.stderr)
                    return

    def release(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth:
            return
        from obstore.exceptions import PreconditionError

        self._stop.set()
        with self._guard:
            try:
                self._put(0.0, {"e_tag": self._etag})  # released: the next writer takes it at once
            except PreconditionError:
                pass  # taken over after a stall: it is someone else's now
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None

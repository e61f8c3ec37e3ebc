"""Faults of the machine or the storage as one line: what every command says instead of a traceback.

A command's own errors are one-line already (``fail``); what is left reaches the top-level group:
an ``OSError`` from a read-only or full disk, or LanceDB's and the object store's raw errors (a
``RuntimeError``/``ValueError``/``OSError`` whose text holds a Rust error chain). :func:`describe`
turns those into one line naming the path or URI and the cause, and says what became of the store;
anything it does not recognise stays a traceback (a bug to report, not a fault to explain).

Every store write is one LanceDB commit (a new table version written last), so a write that fails
leaves the store at its previous version: the messages can say so.

>>> describe(OSError(30, "Read-only file system", "/mnt/store/.bemerc-write.lock"), "/mnt/store")
'/mnt/store/.bemerc-write.lock: cannot write: the file system is read-only; the store was not changed (give a writable --store / --run-dir)'
"""

from __future__ import annotations

import errno
import os
import re

CHECK_HINT = "`bemerc store check --store {store}` names every damaged table"
# an error chain from LanceDB / the Rust object store, as opposed to a Python error of our own
_RUST = re.compile(r"lance error|LanceError|Failed to connect to namespace|object_store|RetryError|\.rs:\d+|os error \d+")
_OS_ERROR = re.compile(r"os error (\d+)|\[Errno (\d+)\]")
_NOT_FOUND = re.compile(r"Not found: (\S+?\.lance\S*?)(?:,|\s|$)")
_TABLE = re.compile(r"([^/\s]+)\.lance(?:/|$)")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def _errno(exc: BaseException, text: str) -> int | None:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = _OS_ERROR.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def _disk_fault(code: int | None, where: str, store: str) -> str | None:
    if code == errno.ENOSPC or code == getattr(errno, "EDQUOT", -1):
        return (f"{where}: no space left on the device; the store is consistent (the write that failed was not "
                f"committed; what was written before stays): free space, then run the same command again")
    if code == errno.EROFS:
        return f"{where}: cannot write: the file system is read-only; the store was not changed (give a writable --store / --run-dir)"
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; the store was not changed"
    return None


def _object_store_fault(text: str, store: str) -> str | None:
    bucket = re.search(r"<Code>NoSuchBucket</Code>.*?(?:<BucketName>([^<]+)</BucketName>|$)", text, re.S)
    if bucket:
        name = bucket.group(1) or store.split("://", 1)[-1].split("/", 1)[0]
        return f"{store}: bucket {name!r} does not exist on the object store (create it first); nothing was written"
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or "the object store"
    for pattern, cause in (("ConnectionRefused|Connection refused", "connection refused"), ("dns error|failed to lookup", "name not found"),
                           ("timed out|Timeout|deadline", "timed out"), ("tcp connect error|Connect, |error sending request|connection closed|reset by peer|IncompleteMessage", "connection failed")):
        if re.search(pattern, text):
            return (f"{store}: cannot reach {endpoint} ({cause}); what was written before stays in the store "
                    "(run the command again once the object store answers)")
    code = re.search(r"<Code>([^<]+)</Code>(?:<Message>([^<]+)</Message>)?", text)
    if code:
        return f"{store}: the object store refused the request: {code.group(1)}{': ' + code.group(2) if code.group(2) else ''}"
    return None


def _damage(text: str, store: str) -> str | None:
    missing = _NOT_FOUND.search(text)
    if missing:
        path = missing.group(1)
        path = path if path.startswith(("/", "s3:", "gs:", "az:")) or "://" in path else "/" + path
        table = _TABLE.search(path)
        name = f"table {table.group(1)!r}" if table else "a table"
        return f"{store}: the store is damaged: {name} cannot be read: it lacks {path}; {CHECK_HINT.format(store=store)}"
    from bemerc.store.check import DAMAGE, lance_cause

    if DAMAGE.search(text):
        table = _TABLE.search(text)
        name = f"table {table.group(1)!r}" if table else "a table"
        return f"{store}: the store is damaged: {name} has an unreadable file ({lance_cause(RuntimeError(text))}); {CHECK_HINT.format(store=store)}"
    return None


def describe(exc: BaseException, store: str) -> str | None:
    """One line for a storage or machine fault raised by a command on ``store``; None when ``exc``
    is none of those (it stays a traceback)."""
    from bemerc.store.db import DamagedTableError

    for e in _chain(exc):
        if isinstance(e, DamagedTableError):
            return str(e)
        text = str(e)
        if not isinstance(e, OSError) and not _RUST.search(text):
            continue
        where = getattr(e, "filename", None) or store
        fault = _disk_fault(_errno(e, text), str(where), store)
        if fault:
            return fault
        if not _RUST.search(text):
            continue
        if "://" in store:
            fault = _object_store_fault(text, store)
            if fault:
                return fault
        fault = _damage(text, store)
        if fault:
            return fault
    return None


def store_argument(args: list[str]) -> str:
    """The ``--store`` a command line names (``--store X`` or ``--store=X``), else $BEMERC_STORE, else
    the default ``store``."""
    for i, arg in enumerate(args):
        if arg == "--store" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--store="):
            return arg.split("=", 1)[1]
    return os.environ.get("BEMERC_STORE") or "store"

"""Single objects on object storage (``s3://``, ``gs://``, ``az://``, ``file://``), read with obstore.

One place opens a URI: the store's lease lock, ingest (a manifest or media on object storage) and the
extractors' media reader (:func:`bemerc.extract.media.local_media`) all call :func:`open_object`.
Credentials, endpoint and region come from the environment, as for LanceDB (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP``; ``GOOGLE_*``,
``AZURE_*``). Errors are :class:`ObjectError`: one line naming the URI and the problem.

>>> split_uri("s3://bucket/corpus/clips/a.mp4")
('s3://bucket', 'corpus/clips/a.mp4')
>>> join_uri("s3://bucket/corpus/manifest.csv", "clips/a.mp4")
's3://bucket/corpus/clips/a.mp4'
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

_STORES: dict[tuple[str, str | None], Any] = {}  # one obstore client per bucket and process
_STORES_GUARD = threading.Lock()


class ObjectError(OSError):
    """An object that cannot be read: ``str()`` is ``"{uri}: {problem}"``; ``missing`` when it does not exist."""

    def __init__(self, uri: str, problem: str, missing: bool = False):
        self.uri = uri
        self.problem = problem
        self.missing = missing
        super().__init__(f"{uri}: {problem}")


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD request says about an object."""

    size: int
    etag: str | None


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names object storage (``s3://bucket/key``) rather than a local path.

    >>> is_uri("s3://bucket/store"), is_uri("/data/store"), is_uri(Path("clips/a.mp4"))
    (True, False, False)
    """
    return "://" in str(path)


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme://bucket, key)`` of an object URI."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        raise ObjectError(uri, "not an object URI (expected scheme://bucket/key)")
    if scheme == "file":
        return "file://", rest.lstrip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ObjectError(uri, "no bucket in the URI")
    return f"{scheme}://{bucket}", key


def join_uri(base: str, relative: str) -> str:
    """``relative`` resolved against the folder of the object ``base`` (``..`` allowed)."""
    root, key = split_uri(base)
    parts: list[str] = []
    for part in (*PurePosixPath(key).parent.parts, *PurePosixPath(relative).parts):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in (".", "/"):
            parts.append(part)
    return f"{root}/{'/'.join(parts)}" if root != "file://" else f"file:///{'/'.join(parts)}"


def _client(root: str, uri: str) -> Any:
    """The obstore client of ``root`` (``scheme://bucket``), made once per bucket and endpoint."""
    client = (root, os.environ.get("AWS_ENDPOINT_URL"))  # a new endpoint in the environment gets a new client
    with _STORES_GUARD:
        store = _STORES.get(client)
        if store is None:
            from obstore.store import from_url

            try:
                store = from_url(root if root != "file://" else "file:///")
            except Exception as e:  # obstore's configuration errors: unknown scheme, bad options
                raise ObjectError(uri, f"cannot open object storage ({_one_line(e)})") from None
            _STORES[client] = store
    return store


def open_object(uri: str) -> tuple[Any, str]:
    """``(obstore store, key)`` for an object URI; the store client is made once per bucket."""
    root, key = split_uri(uri)
    store = _client(root, uri)
    if not key:
        raise ObjectError(uri, "no object key after the bucket")
    return store, key


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def _raise(uri: str, error: Exception) -> None:
    from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

    if isinstance(error, (NotFoundError, FileNotFoundError)):
        raise ObjectError(uri, "object not found", missing=True) from None
    if isinstance(error, (PermissionDeniedError, UnauthenticatedError)):
        raise ObjectError(uri, f"access denied ({_one_line(error)})") from None
    raise ObjectError(uri, f"cannot read ({_one_line(error)})") from None


def head(uri: str) -> ObjectInfo:
    """Size and ETag of an object; :class:`ObjectError` (``missing``) when there is none."""
    import obstore

    store, key = open_object(uri)
    try:
        meta = obstore.head(store, key)
    except Exception as e:
        _raise(uri, e)
    return ObjectInfo(size=int(meta["size"]), etag=meta.get("e_tag"))


def read_bytes(uri: str, start: int = 0, length: int | None = None) -> bytes:
    """An object's bytes, or ``length`` of them from ``start``."""
    import obstore

    store, key = open_object(uri)
    try:
        if length is None and start == 0:
            return bytes(obstore.get(store, key).bytes())
        return bytes(obstore.get_range(store, key, start=start, length=length))
    except Exception as e:
        _raise(uri, e)
    raise AssertionError("unreachable")


def sha256(uri: str) -> str:
    """sha256 of an object's bytes, streamed in chunks (the object is never held whole)."""
    import obstore

    store, key = open_object(uri)
    digest = hashlib.sha256()
    try:
        for chunk in obstore.get(store, key).stream(min_chunk_size=1 << 20):
            digest.update(memoryview(chunk))
    except Exception as e:
        _raise(uri, e)
    return digest.hexdigest()


def download(uri: str, dest: str | Path) -> ObjectInfo:
    """Copy an object to the local file ``dest`` (written beside it, then renamed into place)."""
    import obstore

    store, key = open_object(uri)
    dest = Path(dest)
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
    size = 0
    try:
        result = obstore.get(store, key)
        chunks = iter(result.stream(min_chunk_size=4 << 20))
        with open(partial, "wb") as fh:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as e:  # the object went away or the connection broke mid-read
                    _raise(uri, e)
                try:
                    size += fh.write(memoryview(chunk))
                except OSError as e:
                    raise ObjectError(uri, f"cannot write the local copy {dest} ({e.strerror or e})") from None
        os.replace(partial, dest)
    except ObjectError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as e:
        partial.unlink(missing_ok=True)
        _raise(uri, e)
    return ObjectInfo(size=size, etag=result.meta.get("e_tag"))


class _Listing:
    """Every object under a prefix, listed once: key -> size, and the folders their keys imply."""

    def __init__(self, root: str):
        import obstore

        bucket, prefix = split_uri(root)
        store, prefix = _client(bucket, root), prefix.strip("/")  # a whole bucket is a folder too
        self.sizes: dict[str, int] = {}
        try:
            for chunk in obstore.list(store, prefix or None, chunk_size=1000):
                for meta in chunk:
                    self.sizes[meta["path"]] = int(meta["size"])
        except Exception as e:
            _raise(root, e)
        self.folders = {str(parent) for key in self.sizes for parent in PurePosixPath(key).parents if str(parent) != "."}


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class ObjectPath:
    """A read-only, :class:`pathlib.Path`-like view of a folder on object storage, for the corpus
    readers (``bemerc ingest meld s3://bucket/MELD``, ``ingest iemocap``): one listing of the root
    prefix answers ``exists``/``is_dir``/``is_file``/``glob``; ``read_text``/``read_bytes`` GET the
    object; ``str()`` is its URI. Folders are the prefixes of listed keys (object storage has no
    empty folders).

    >>> root = ObjectPath("s3://bucket/MELD")  # doctest: +SKIP
    >>> sorted(p.name for p in root.glob("*.csv"))  # doctest: +SKIP
    ['dev_sent_emo.csv', 'train_sent_emo.csv']
    """

    def __init__(self, uri: str, _listing: _Listing | None = None, _root: str | None = None):
        self.uri = uri.rstrip("/")
        self._root = _root or self.uri
        self._listing = _listing

    @property
    def listing(self) -> _Listing:
        if self._listing is None:
            self._listing = _Listing(self._root)
        return self._listing

    @property
    def key(self) -> str:
        return split_uri(self.uri)[1].strip("/")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> "ObjectPath":
        root, key = split_uri(self.uri)
        parent = str(PurePosixPath(key).parent)
        return ObjectPath(root if parent == "." else f"{root}/{parent}", self._listing, self._root)

    def __truediv__(self, part: str) -> "ObjectPath":
        return ObjectPath(f"{self.uri}/{str(part).strip('/')}", self._listing, self._root)

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"ObjectPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: "ObjectPath") -> bool:
        return self.uri < other.uri

    def resolve(self) -> "ObjectPath":
        return self

    def is_file(self) -> bool:
        return self.key in self.listing.sizes

    def is_dir(self) -> bool:
        return self.key in self.listing.folders or (self.uri == self._root and bool(self.listing.sizes))

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> _Stat:
        if not self.is_file():
            raise FileNotFoundError(self.uri)
        return _Stat(self.listing.sizes[self.key])

    def read_bytes(self) -> bytes:
        return read_bytes(self.uri)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def glob(self, pattern: str) -> list["ObjectPath"]:
        """Files and folders below this one whose path relative to it matches ``pattern`` (``*`` within
        a name, ``**/`` any folders), sorted."""
        import fnmatch

        base = self.key
        inside = [k for k in (*self.listing.sizes, *self.listing.folders) if not base or k.startswith(base + "/")]
        relative = [k[len(base) + 1:] if base else k for k in inside]
        anywhere, pattern = pattern.startswith("**/"), pattern.removeprefix("**/")
        depth = pattern.count("/") + 1  # path parts the pattern spans
        matches = []
        for rel in relative:
            parts = rel.split("/")
            if len(parts) < depth or (not anywhere and len(parts) > depth):  # "**/": below any folders
                continue
            if fnmatch.fnmatchcase("/".join(parts[-depth:]), pattern):
                matches.append(self / rel)
        return sorted(set(matches))


def as_path(path: str | Path) -> "Path | ObjectPath":
    """A local path resolved (``~`` expanded), or an :class:`ObjectPath` for an object URI."""
    return ObjectPath(str(path)) if is_uri(path) else Path(path).expanduser().resolve()

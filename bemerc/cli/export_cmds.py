"""`bemerc export instructions|features|predictions`: the store's instruction data, feature sets and a run's predictions for other tools."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from bemerc.cli.common import DEFAULT_STORE, JsonOption, StoreOption, console, fail, open_store
from bemerc.cli.tune_cmds import Layout

export_app = typer.Typer(
    help="Write the store's instruction data, feature sets and runs' predictions in the formats other tools read (LLaMA-Factory, TRL, axolotl, numpy).",
    no_args_is_help=True,
)


class Format(str, Enum):
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    jsonl = "jsonl"


class FeatureFormat(str, Enum):
    safetensors = "safetensors"
    npy = "npy"


OutArgument = Annotated[Path, typer.Argument(help="Output folder (made when absent; files of an earlier export are replaced).", show_default=False)]
DatasetOption = Annotated[str | None, typer.Option(help="Dataset to export when the store holds several.")]


@export_app.command("instructions")
def instructions(
    out: OutArgument,
    store: StoreOption = DEFAULT_STORE,
    fmt: Annotated[Format, typer.Option("--format", help="sharegpt: LLaMA-Factory's ShareGPT (`conversations` of from/value, `system`) plus its dataset_info.json; alpaca: instruction/input/output (with `history` in the dialogue layout) plus dataset_info.json; jsonl: `messages` of role/content (TRL, axolotl).")] = Format.sharegpt,
    layout: Annotated[Layout, typer.Option(help="dialogue: one conversation per dialogue, each turn answered by its emotion; utterance: one prompt per utterance with its last --context turns (tune's layouts).")] = Layout.dialogue,
    split: Annotated[str | None, typer.Option(help="Comma-separated splits (train,dev,test). Default: every split with labels.")] = None,
    with_media: Annotated[bool, typer.Option("--with-media", help="Add each turn's clip to `videos` (or `audios` without video) with a <video>/<audio> placeholder where tune puts soft tokens, and `clips` with each clip's path, start_s and end_s.")] = False,
    context: Annotated[int | None, typer.Option(help="utterance layout: previous utterances shown (tune's --context; default 3).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt template: a packaged name or a .toml file (default: tune's for the layout).")] = None,
    dataset: DatasetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export the prompts `bemerc tune` builds as instruction data for another trainer.

    The messages are tune's (the same template, speakers, words, behaviour descriptions, context and
    answers: `bemerc tune --modalities none --show-prompt UID` shows one through a chat template),
    written before any chat template, which the other trainer applies. No model or tokenizer is
    loaded. Writes OUT/DATASET-LAYOUT-SPLIT.jsonl per split and, for sharegpt and alpaca, their entries
    (DATASET_LAYOUT_SPLIT) in OUT/dataset_info.json, merged into one already there. Soft tokens do not
    travel in text; --with-media puts the clips in their place.

    Example: `bemerc export instructions LLaMA-Factory/data --split train,dev`, then
    `llamafactory-cli train ... --dataset meld_dialogue_train --eval_dataset meld_dialogue_dev`
    (docs/instructions.md).
    """
    from bemerc.store import StoreError
    from bemerc.train.export import ExportError, export_instructions
    from bemerc.train.tune.config import TuneError
    from bemerc.train.tune.prompt import PromptError

    splits = [s.strip() for s in split.split(",") if s.strip()] if split else None
    try:
        result = export_instructions(open_store(store), out, fmt=fmt.value, layout=layout.value, splits=splits, with_media=with_media,
                                     dataset=dataset, context=context, merc_prompt=prompt)
    except (ExportError, TuneError, PromptError, StoreError, OSError) as exc:  # OSError: OUT cannot be written
        fail(str(exc))
    if as_json:
        print(json.dumps({"files": {s: str(p) for s, p in result.files.items()}, "examples": result.examples,
                          "utterances": result.utterances, "dataset_info": result.dataset_info, "spans": result.spans,
                          "seconds": round(result.seconds, 2)}, indent=2))
        return
    for s, path in result.files.items():
        console.print(f"{s}: {result.utterances[s]:,} utterances in {result.examples[s]:,} examples -> {path}", highlight=False)
    if result.dataset_info:
        console.print(f"dataset_info.json: {', '.join(result.dataset_info)} ({out / 'dataset_info.json'})", highlight=False)
    if result.spans:
        console.print(f"[yellow]{result.spans:,} clips are spans of longer files (clips[].start_s/end_s); a trainer that reads "
                      "`videos`/`audios` whole needs them cut first[/]")


@export_app.command("features")
def features(
    out: OutArgument,
    modality: Annotated[str, typer.Option(help="The modality whose feature set is exported (text, audio, behavior, visual).", show_default=False)],
    store: StoreOption = DEFAULT_STORE,
    fmt: Annotated[FeatureFormat, typer.Option("--format", help="safetensors: one file of named tensors; npy: one .npy per tensor.")] = FeatureFormat.safetensors,
    speaker_norm: Annotated[bool, typer.Option("--speaker-norm", help="Normalise audio, behaviour and visual features per speaker to the train rows' mean and std, as `bemerc tune` reads them (text is never normalised).")] = False,
    dataset: DatasetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export one feature set as the tensors bemerc's projectors read, with a uid index.

    Writes OUT/features.safetensors (tensors `features`: (N, D), or (N, K, D) for behaviour tokens,
    float32, zeros where `present` is false; `present`: (N,) bool; with --speaker-norm also
    `train_mean`, `train_std`) or OUT/features.npy and OUT/present.npy; OUT/index.csv (row, uid,
    dataset, split, dialogue_id, turn, speaker, label, present) and OUT/meta.json (feature set, shape,
    normalisation). Arrow tools (polars, pandas, duckdb) read the store's Lance tables as they are (docs/store.md).

    Example: `bemerc export features feats/audio --modality audio --speaker-norm`
    """
    from bemerc.store import StoreError
    from bemerc.train.export import ExportError, export_features
    from bemerc.train.tune.config import TuneError

    try:
        result = export_features(open_store(store), out, modality, fmt=fmt.value, speaker_norm=speaker_norm, dataset=dataset)
    except (ExportError, TuneError, StoreError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({"files": [str(p) for p in result.files], "feature_set": result.feature_set, "shape": result.shape,
                          "present": result.present, "speaker_norm": result.normalised}, indent=2))
        return
    note = "normalised per speaker" if result.normalised else "as stored" + (" (text is never normalised per speaker)" if speaker_norm else "")
    console.print(f"{result.feature_set}: {result.shape} ({result.present:,} present), {note} -> {out}", highlight=False)


@export_app.command("predictions")
def predictions(
    run: Annotated[str, typer.Argument(help="Run id, or KIND:latest (baseline:latest, tune:latest, ...).", show_default=False)],
    out: Annotated[Path, typer.Argument(help="File to write: .csv, .jsonl or .parquet.", show_default=False)],
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Write a run's stored predictions as a file `bemerc ingest predictions` reads.

    Columns: `uid`, then one probability column per class, each value the stored float32 exactly.
    For sharing a run's predictions, or checking the round trip (docs/instructions.md).

    Example: `bemerc export predictions baseline:latest baseline.csv`
    """
    from bemerc.store import StoreError
    from bemerc.train.external import write_predictions
    from bemerc.train.fuse import FusionError, resolve_runs

    try:
        db = open_store(store)
        path = write_predictions(db, resolve_runs(db, [run])[0], out)
    except (FusionError, StoreError, ValueError, OSError) as exc:
        fail(str(exc))
    console.print(f"{run} -> {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")

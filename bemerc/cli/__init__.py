"""The ``bemerc`` command line: a thin typer layer over the stage packages.

Each ``*_cmds`` module registers its commands with ``register(app)``, so every stage owns its own CLI
file. The modules load lazily: :data:`COMMANDS` names each command's module and the one line
``bemerc --help`` shows for it, and a module (with the stage it drives) is imported only when one of
its commands runs or shows its own help. ``bemerc --help`` therefore imports no stage at all.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

# Before any model library is imported: never wait on a model hub from the command line unless the
# user asked for it (the `hub` profile sets BEMERC_ALLOW_HUB=1).
if os.environ.get("BEMERC_ALLOW_HUB") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# MediaPipe and LiteRT log to stderr through glog/TF at start-up; keep the terminal for our progress.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    import click

# command -> (module in bemerc.cli, the help line `bemerc --help` lists; tests/test_cli.py checks it
# equals the first paragraph of the command's own help). In the order `bemerc --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "store": ("store_cmds", "Inspect the LanceDB feature store."),
    "ingest": ("ingest_cmds", "Read a corpus into the store's `utterances` table. Everything is checked before "
               "anything is written: bad input stops with one line naming the file, the row and the problem, and "
               "the store stays as it was. Re-ingesting the same data changes nothing."),
    "models": ("models_cmds", "Prepare and list the models of a profile."),
    "extract": ("extract_cmds", "Extract features for every utterance in the store that lacks them."),
    "baseline": ("train_cmds", "Train the XGBoost late-fusion baseline on the store."),
    "tune": ("tune_cmds", "Instruction-tune an LLM with LoRA on the store (BeMERC's model) and evaluate it on dev (and test)."),
    "export": ("export_cmds", "Write the store's instruction data, feature sets and runs' predictions in the formats "
               "other tools read (LLaMA-Factory, TRL, axolotl, numpy)."),
    "fuse": ("fuse_cmds", "Fuse the stored probabilities of two or more runs, with weights fit on dev."),
    "compare": ("train_cmds", "Compare runs side by side in a report."),
    "query": ("query_cmds", "Query stored utterances, embeddings and predictions."),
    "serve": ("serve_cmds", "Serve the store and its trained runs over HTTP: a browse page at `/`, the API "
              "documented at `/docs`."),
    "demo": ("demo_cmds", "Make the embedded demo: short labelled dialogues with speech and a talking-face clip per line."),
}


def click_exceptions() -> type[Exception]:
    import click

    return click.exceptions.ClickException


def load_command(name: str) -> click.Command | None:
    """The click command ``name``, importing its module (None when the module is not there)."""
    try:
        module = importlib.import_module(f"bemerc.cli.{COMMANDS[name][0]}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bemerc.cli.{COMMANDS[name][0]}":
            raise  # a missing dependency of the module is a real error
        return None
    registry = typer.Typer()
    module.register(registry)
    return typer.main.get_group(registry).commands.get(name)


class LazyGroup(TyperGroup):
    """The top-level group: lists :data:`COMMANDS` from their help lines, loads one when it runs."""

    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if self._listing:  # `bemerc --help`: the help line is enough
            return TyperCommand(cmd_name, help=COMMANDS[cmd_name][1])
        if cmd_name not in self.commands:
            command = load_command(cmd_name)
            if command is None:
                return None
            self.commands[cmd_name] = command
        return self.commands[cmd_name]

    def invoke(self, ctx: click.Context):
        """Run the command; a fault of the disk or of the storage (read-only, full, a damaged table, an
        object store that does not answer) becomes one line (:mod:`bemerc.cli.faults`)."""
        args = [*getattr(ctx, "protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click_exceptions(), KeyboardInterrupt):
            raise
        except Exception as exc:
            from bemerc.cli.common import fail
            from bemerc.cli.faults import describe, store_argument

            message = describe(exc, store_argument(args))
            if message is None:
                raise
            fail(message)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="bemerc",
    cls=LazyGroup,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)


@app.callback()
def bemerc() -> None:
    """Multimodal emotion recognition in conversation.

    Typical session: `bemerc ingest meld DATA/MELD`, `bemerc extract --modality all`, `bemerc baseline`,
    `bemerc tune`, `bemerc fuse baseline:latest tune:latest`, `bemerc compare`. Every command that
    touches the feature store takes --store (or the BEMERC_STORE environment variable).
    """


def main() -> None:
    """Entry point of the ``bemerc`` console script."""
    app()

"""The ``bemerc`` command line: a thin typer layer over the stage packages.

Each ``*_cmds`` module registers its commands on the one app, so every stage owns its own CLI file.
"""

from __future__ import annotations

import os

# Before any model library is imported: never wait on a model hub from the command line unless the
# user asked for it (the `hub` profile sets BEMERC_ALLOW_HUB=1).
if os.environ.get("BEMERC_ALLOW_HUB") != "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# MediaPipe and LiteRT log to stderr through glog/TF at start-up; keep the terminal for our progress.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import typer

from bemerc.cli import (
    demo_cmds,
    extract_cmds,
    fuse_cmds,
    ingest_cmds,
    models_cmds,
    query_cmds,
    serve_cmds,
    store_cmds,
    train_cmds,
    tune_cmds,
)

app = typer.Typer(
    name="bemerc",
    help=(
        "Multimodal emotion recognition in conversation.\n\n"
        "Typical session: `bemerc ingest meld DATA/MELD`, `bemerc extract --modality all`, "
        "`bemerc baseline`, `bemerc tune`, `bemerc fuse baseline:latest tune:latest`, `bemerc compare`. Every command that touches the "
        "feature store takes --store (or the BEMERC_STORE environment variable)."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

for module in (store_cmds, ingest_cmds, models_cmds, extract_cmds, train_cmds, tune_cmds, fuse_cmds, query_cmds, serve_cmds, demo_cmds):
    module.register(app)


def main() -> None:
    """Entry point of the ``bemerc`` console script."""
    app()

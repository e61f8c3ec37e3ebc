"""`bemerc demo`: make the embedded demo's speech, face clips and manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from bemerc.cli.common import console, fail


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Annotated[Path, typer.Option("--out", help="Folder for manifest.jsonl and media/.")] = Path("demo_data"),
        force: Annotated[bool, typer.Option("--force", help="Remake every file, even those that exist.")] = False,
    ) -> None:
        """Make the embedded demo: short labelled dialogues with speech and a talking-face clip per line.

        The dialogues ship with bemerc; the media are made here, offline, with espeak-ng and ffmpeg
        (installed by `make setup`), in well under a minute. A second run reuses the files.

        Next step: `bemerc ingest manifest OUT/manifest.jsonl` (OUT is `demo_data` unless --out).
        """
        from bemerc.demo import make_demo  # imported here so that `bemerc --help` stays fast

        try:
            with console.status("Making the demo's speech and face clips..."):
                manifest = make_demo(out, force=force)
        except RuntimeError as err:
            fail(str(err))
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
        console.print(_counts_table(rows))
        # soft_wrap: a long path must stay on one line so that it can be copied.
        console.print(f"Manifest: [bold]{escape(str(manifest))}[/]", soft_wrap=True)
        console.print(f"Next: [bold]bemerc ingest manifest {escape(str(manifest))}[/]", soft_wrap=True)


def _counts_table(rows: list[dict]) -> Table:
    """Dialogues, utterances and utterances per label, by split and in all."""
    splits = ("train", "dev", "test")
    parts = [[row for row in rows if row["split"] == split] for split in splits] + [rows]
    table = Table("", *splits, "all", title="bemerc demo")
    table.add_row("dialogues", *(str(len({row["dialogue_id"] for row in part})) for part in parts))
    table.add_row("utterances", *(str(len(part)) for part in parts))
    for label in sorted({row["label"] for row in rows}):
        table.add_row(label, *(str(sum(row["label"] == label for row in part)) for part in parts))
    return table

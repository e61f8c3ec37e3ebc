"""`bemerc extract`: fill the store with features (placeholder until the extractors land)."""

import typer

from bemerc.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract() -> None:
        """Extract text, audio, behaviour and visual features into the store."""
        not_built("`bemerc extract`")

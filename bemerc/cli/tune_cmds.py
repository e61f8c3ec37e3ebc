"""`bemerc tune` (placeholder until the tuning issue lands)."""

import typer

from bemerc.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune() -> None:
        """Instruction-tune an LLM with LoRA on the store's features."""
        not_built("`bemerc tune`")

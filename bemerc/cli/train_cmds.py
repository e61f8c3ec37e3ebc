"""`bemerc baseline`, `bemerc compare` (placeholders until their issues land)."""

import typer

from bemerc.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("baseline")
    def baseline() -> None:
        """Train the XGBoost late-fusion baseline on the store."""
        not_built("`bemerc baseline`")

    @app.command("compare")
    def compare() -> None:
        """Compare runs side by side in a report."""
        not_built("`bemerc compare`")

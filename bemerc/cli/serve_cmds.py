"""`bemerc serve`: the HTTP API (placeholder until the serve issue lands)."""

import typer

from bemerc.cli.common import not_built


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve() -> None:
        """Serve the store and trained runs over HTTP."""
        not_built("`bemerc serve`")

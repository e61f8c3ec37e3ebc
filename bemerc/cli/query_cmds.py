"""`bemerc query`: search and export the store (placeholder until the serve issue lands)."""

import typer

from bemerc.cli.common import not_built

query_app = typer.Typer(help="Query stored utterances, embeddings and predictions.", no_args_is_help=True)


@query_app.command("similar")
def similar() -> None:
    """Nearest utterances by a stored embedding."""
    not_built("`bemerc query similar`")


def register(app: typer.Typer) -> None:
    app.add_typer(query_app, name="query")

"""`bemerc models`: prepare model weights (placeholder until the extractors land)."""

import typer

from bemerc.cli.common import not_built

models_app = typer.Typer(help="Prepare and list the models of a profile.", no_args_is_help=True)


@models_app.command("prepare")
def prepare() -> None:
    """Turn packaged weights into standard local model dirs."""
    not_built("`bemerc models prepare`")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")

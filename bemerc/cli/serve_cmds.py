"""`bemerc serve`: the HTTP API and browse page over a store (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bemerc.cli.common import DEFAULT_STORE, StoreOption, console, fail


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        store: StoreOption = DEFAULT_STORE,
        host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
        profile: Annotated[
            str, typer.Option(help="Model profile the run's features were extracted with (for /predict).")
        ] = "offline",
        report_dir: Annotated[
            Path | None, typer.Option(help="Folder of `bemerc compare --out`; its report.md is served with each run.")
        ] = None,
        max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest media upload accepted, per file.")] = 50.0,
        max_request_mb: Annotated[float, typer.Option(min=0.001, help="Largest /predict request body accepted.")] = 200.0,
    ) -> None:
        """Serve the store and its trained runs over HTTP: a browse page at `/`, the API documented at `/docs`.

        Example: `bemerc serve --store out/store --port 8000`, then open http://127.0.0.1:8000/
        """
        import uvicorn

        from bemerc.serve import create_app
        from bemerc.serve.predict import UploadLimits

        if not store.is_dir():
            fail(f"{store}: no store here (create one with `bemerc ingest ...`)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"[yellow]warning:[/] binding {host}: the API is reachable from other machines and has no authentication")
        limits = UploadLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_request_bytes=int(max_request_mb * 2**20))
        application = create_app(store, profile=profile, report_dir=report_dir, limits=limits)
        console.print(f"serving {store} on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops")
        uvicorn.run(application, host=host, port=port, log_level="warning")

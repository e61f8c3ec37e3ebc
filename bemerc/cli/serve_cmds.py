"""`bemerc serve`: the HTTP API and browse page over a store (FastAPI + uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bemerc.cli.common import DEFAULT_STORE, ProfileOption, StoreOption, console, fail, open_store


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        store: StoreOption = DEFAULT_STORE,
        host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only. Any other needs --token.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
        token: Annotated[
            str | None,
            typer.Option(envvar="BEMERC_TOKEN", help="Access token every request must carry (`Authorization: Bearer TOKEN`; "
                                                     "the browse page: open /?token=TOKEN once). Required unless bound to loopback."),
        ] = None,
        allow_host: Annotated[
            list[str] | None, typer.Option("--allow-host", help="A further name the server answers to in the Host header (repeatable), e.g. a proxy's.")
        ] = None,
        profile: ProfileOption = None,  # the one the run's features were extracted with (for /predict)
        report_dir: Annotated[
            Path | None, typer.Option(help="Folder of `bemerc compare --out`; its report.md is served with each run.")
        ] = None,
        max_upload_mb: Annotated[float, typer.Option(min=0.001, help="Largest media upload accepted, per file.")] = 50.0,
        max_request_mb: Annotated[float, typer.Option(min=0.001, help="Largest /predict request body accepted.")] = 200.0,
        max_media_s: Annotated[float, typer.Option(min=0.1, help="Longest audio/video accepted per utterance, in seconds (probed before decoding).")] = 60.0,
        max_pending: Annotated[int, typer.Option(min=1, help="/predict requests running or waiting at once; more get 503 with Retry-After.")] = 16,
        max_media_pending: Annotated[int, typer.Option(min=1, help="Of those, requests that upload media.")] = 2,
        request_timeout: Annotated[float, typer.Option(min=1.0, help="Seconds one /predict request may take, waiting included.")] = 120.0,
        receive_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds a client has to send a request's headers and its whole body (408 or a closed connection after); a /predict request waits in the queue only once its body has arrived.")] = 30.0,
    ) -> None:
        """Serve the store and its trained runs over HTTP: a browse page at `/`, the API documented at `/docs`.

        Only this machine can connect by default, and pages of other sites cannot use the API (Host
        and Origin are checked). To serve other machines, bind another interface and give a token:
        `BEMERC_TOKEN=$(openssl rand -hex 16) bemerc serve --host 0.0.0.0`.

        Example: `bemerc serve --store out/store --port 8000`, then open http://127.0.0.1:8000/
        """
        import socket

        import uvicorn

        from bemerc.serve import create_app
        from bemerc.serve.guard import LOOPBACK_NAMES, WILDCARD_HOSTS
        from bemerc.serve.request import ServeLimits
        from bemerc.serve.server import server_config

        open_store(store)  # a one-line error when there is no store
        if host not in LOOPBACK_NAMES and not token:
            fail(f"binding {host} makes the API reachable from other machines: give an access token with --token or "
                 "BEMERC_TOKEN (e.g. `export BEMERC_TOKEN=$(openssl rand -hex 16)`)")
        names = tuple(allow_host or ())
        if host in WILDCARD_HOSTS:
            names += (socket.gethostname(), socket.getfqdn())
        limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_request_bytes=int(max_request_mb * 2**20),
                             max_media_s=max_media_s, max_pending=max_pending, max_media_pending=max_media_pending,
                             request_timeout_s=request_timeout, receive_timeout_s=receive_timeout)
        application = create_app(store, profile=profile, report_dir=report_dir, limits=limits, host=host,
                                  allow_hosts=names, token=token)
        console.print(f"serving {store} on http://{host}:{port}/ (API docs at /docs){'; token required' if token else ''}; Ctrl-C stops")
        uvicorn.Server(server_config(application, limits, host=host, port=port, log_level="warning")).run()

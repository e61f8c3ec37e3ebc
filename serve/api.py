"""The HTTP API and browse page over one store: FastAPI, run with uvicorn by ``bemerc serve``.

Endpoints (OpenAPI at ``/docs``): ``GET /utterances/{uid}``, ``GET /similar``, ``GET /runs``,
``GET /runs/{run_id}/report``, ``GET /dialogues``, ``GET /dialogues/{split}/{dialogue_id}``,
``GET /info``, ``POST /predict`` and the page at ``/``. :func:`create_app` assembles the routers
(:mod:`bemerc.serve.routes`: browse, runs, predict) behind the :class:`~bemerc.serve.guard.Guard`
(Host, Origin and token checks) and maps errors to answers; the rest lives beside it:

- :mod:`bemerc.serve.request`: the ``/predict`` body, :class:`ServeLimits` and :class:`PredictError`;
- :mod:`bemerc.serve.uploads`: saving and checking uploaded media (ffprobe, decoded duration);
- :mod:`bemerc.serve.worker`: the media extraction process;
- :mod:`bemerc.serve.predict`: a dialogue through the run's extractors and model;
- :mod:`bemerc.serve.server`: uvicorn with a deadline on request headers.

Nothing a client sends names a server file or is executed: store reads take only ids (quoted as SQL
string literals), report files come from paths the server was started with, and uploads go through
:mod:`bemerc.serve.uploads`.

>>> app = create_app("store")                                 # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)             # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from bemerc.serve.guard import Guard, HostCheck
from bemerc.serve.predict import Predictor
from bemerc.serve.request import PredictError, ServeLimits
from bemerc.serve.routes import browse, predict, runs
from bemerc.serve.routes.predict import Admission
from bemerc.store import Store, StoreError
from bemerc.store import query as Q


def create_app(
    store_path: str | Path,
    *,
    profile: str | None = None,
    report_dir: str | Path | None = None,
    limits: ServeLimits = ServeLimits(),
    host: str = "127.0.0.1",
    allow_hosts: tuple[str, ...] = (),
    token: str | None = None,
) -> FastAPI:
    """The app serving ``store_path``.

    ``profile`` (a name or TOML path; None: the default profile) rebuilds the extractors a run was
    trained with for ``/predict``; ``report_dir`` is where ``bemerc compare --out`` wrote its report
    (served with each run's metrics); ``limits`` bounds uploads and work (50 MB per file, 200 MB per
    request, 64 utterances, 60 s of media per utterance, 16 waiting requests by default). ``host`` is
    the address the server binds and, with ``allow_hosts``, the names a request's ``Host`` may
    carry; ``token``, when given, is required on every request.
    """
    store = Store(store_path, create=False)  # a StoreError when there is no store there
    predictor = Predictor(store, profile, retry_after_s=limits.retry_after_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        predictor.media.close()  # the media worker process ends with the server

    app = FastAPI(
        lifespan=lifespan,
        title="bemerc",
        version="0.1.0",
        description="Browse a bemerc feature store, find similar utterances and predict emotions of new dialogues.",
        max_body_size=limits.max_request_bytes,  # every request; 413 as soon as the body passes it
    )
    app.state.store, app.state.predictor, app.state.report_dir = store, predictor, report_dir
    app.state.limits, app.state.admission = limits, Admission(limits)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.middleware("http")(Guard(HostCheck(host, allow_hosts), token))
    for router in (browse.router, runs.router, predict.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=browse.PAGE_DIR), name="static")
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


async def _predict_error(request: Request, exc: PredictError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # an answer with a reason instead of a dropped connection; the server keeps serving
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)


# How an error a route raises is answered: an unknown id or a missing store is a 404, a PredictError
# its own status, anything else a 500 with its first line.
ERROR_HANDLERS = {Q.QueryError: _not_found, StoreError: _not_found, PredictError: _predict_error, Exception: _internal_error}

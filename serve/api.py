"""The HTTP API and browse page over one store: FastAPI, run with uvicorn by ``bemerc serve``.

Endpoints (OpenAPI at ``/docs``): ``GET /utterances/{uid}``, ``GET /similar``, ``GET /runs``,
``GET /runs/{run_id}/report``, ``GET /dialogues``, ``GET /dialogues/{split}/{dialogue_id}``,
``GET /info``, ``POST /predict`` and the page at ``/``.

Nothing a client sends names a server file or is executed: store reads take only ids (quoted as SQL
string literals), report files come from paths the server was started with, and uploads go through
:mod:`bemerc.serve.predict`.

Other web pages cannot drive the server: a request whose ``Host`` is not the bound address or a
configured name is refused (400, against DNS rebinding), a POST whose ``Origin`` is another site is
refused (403, against cross-site requests), and with an access token every request must carry it
(``Authorization: Bearer TOKEN``, or the cookie set by opening ``/?token=TOKEN``; 401 otherwise).
``/predict`` is bounded: media duration per utterance, requests waiting (503 with ``Retry-After``)
and time per request. A client must send its headers and whole body within ``receive_timeout_s``
(408 otherwise; headers: :class:`TimedH11Protocol`); a request counts against the queue only once its
body has arrived, so clients that trickle hold no slot, and one that drops is logged as one line.

>>> app = create_app("store")                                 # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)             # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import tempfile
import time
from contextlib import asynccontextmanager, contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from bemerc.serve.predict import PredictError, Predictor, PredictRequest, ServeLimits, check_media, upload_slot
from bemerc.store import Store, StoreError
from bemerc.store import query as Q
from bemerc.store.schema import sql_quote
from bemerc.store.runs import list_runs, seed_groups

PAGE_DIR = Path(__file__).parent / "page"
SPLIT_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
REPORT_FILES = ("report.md", "report.html")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
log = logging.getLogger("uvicorn.error")  # where uvicorn logs: one line per dropped or slow client
TOKEN_COOKIE = "bemerc_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


Modality = Enum("Modality", {m: m for m in Q.MODALITIES}, type=str)


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
    hosts = HostCheck(host, allow_hosts)
    admission = Admission(limits)

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
    app.state.store = store
    app.state.predictor = predictor

    @app.exception_handler(Q.QueryError)
    async def _not_found(request: Request, exc: Q.QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(PredictError)
    async def _predict_error(request: Request, exc: PredictError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # an answer with a reason instead of a dropped connection; the server keeps serving
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        refused = hosts.refuse(request) or _foreign_origin(request) or _missing_token(request, token)
        if refused is not None:
            return refused
        if token and request.url.path == "/" and request.query_params.get("token") is not None:
            # the browse page: the token given once in the address becomes a same-site-only cookie
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if not request.url.path.startswith(("/docs", "/redoc")):  # their UIs load scripts from a CDN
            response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:"
        return response

    @app.get("/info", summary="What the store holds")
    def info() -> dict:
        """Splits, modalities with features, feature sets and table row counts."""
        data = store.info()
        splits = store.read("utterances", ["split"])["split"].unique().to_list()
        order = {s: i for i, s in enumerate(("train", "dev", "test"))}
        return {
            "store": data["path"],
            "splits": sorted(splits, key=lambda s: (order.get(s, 9), s)),
            "modalities": sorted({fs.modality for fs in store.feature_sets()}),
            "features": data["features"],
            "tables": data["tables"],
        }

    @app.get("/utterances/{uid:path}", summary="One utterance in full")
    def utterance(uid: str) -> dict:
        """The utterance with its dialogue context, transcript, behaviour description, feature sets,
        failures and every run's prediction. ``uid`` contains slashes: ``/utterances/dev/dia0_utt0``."""
        return Q.show(store, uid).to_dict()

    @app.get("/similar", summary="Nearest utterances")
    def similar(
        uid: Annotated[str, Query(max_length=300, description="Utterance id, e.g. dev/dia0_utt0")],
        modality: Modality = Modality.text,
        k: Annotated[int, Query(ge=1, le=100)] = 10,
        split: Annotated[str | None, Query(pattern=SPLIT_PATTERN, description="Only neighbours from this split")] = None,
    ) -> list[dict]:
        """The ``k`` utterances nearest to ``uid`` by cosine distance of the newest ``modality`` features."""
        where = f"split = {sql_quote(split)}" if split else None
        return Q.to_records(Q.similar(store, uid, modality.value, k=k, where=where))

    @app.get("/runs", summary="Trained runs")
    def runs() -> list[dict]:
        """Every run, oldest first: id, kind, classes, feature sets and metrics per split. A seed
        group (kind ``group``) also has ``group``: its seeds, members and failed seeds, and its
        metrics per split hold the mean, ``std`` and ``per_seed`` values; a member run has the
        ``group_id`` it belongs to (null for a run of no group)."""
        keep = ("run_id", "kind", "created_at", "dataset", "classes", "feature_sets", "metrics")
        stored = list_runs(store)
        groups = seed_groups(stored)
        group_of = {member: g for g, entry in groups.items() for member in entry["members"].values()}
        return Q.to_records([{**{k: r[k] for k in keep}, "group_id": group_of.get(r["run_id"]),
                              **({"group": groups[r["run_id"]]} if r["run_id"] in groups else {})} for r in stored])

    @app.get("/runs/{run_id}/report", summary="A run's metrics and the comparison report")
    def run_report(run_id: str) -> dict:
        """The run's ``metrics.json`` and, when ``bemerc compare`` wrote one into the server's report
        folder, the comparison report (markdown)."""
        run = next((r for r in list_runs(store) if r["run_id"] == run_id), None)
        if run is None:
            raise HTTPException(404, f"no run {run_id!r} in {store.path}")
        metrics_file = Path(run["run_dir"] or "") / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else run["metrics"]
        report = None
        if report_dir is not None:
            found = next((Path(report_dir) / f for f in REPORT_FILES if (Path(report_dir) / f).is_file()), None)
            if found is not None:
                report = {"file": found.name, "format": found.suffix.lstrip("."), "content": found.read_text()}
        return {"run_id": run_id, "kind": run["kind"], "metrics": metrics, "report": report}

    @app.get("/dialogues", summary="Dialogues of a split")
    def dialogues(split: Annotated[str | None, Query(pattern=SPLIT_PATTERN)] = None) -> list[dict]:
        """One row per dialogue: dataset, split, dialogue_id, utterance count, speakers, first line."""
        return Q.to_records(Q.dialogues(store, split))

    @app.get("/dialogues/{split}/{dialogue_id:path}", summary="One dialogue with predictions")
    def dialogue(split: str, dialogue_id: str, dataset: Annotated[str | None, Query(max_length=100)] = None) -> dict:
        """The dialogue's utterances in order with gold labels, behaviour descriptions and every run's
        prediction (``probabilities`` as ``{class: p}``). ``dataset`` is needed only when several
        datasets of the store have this split and dialogue id. ``dialogue_id`` may hold slashes
        (``/dialogues/dev/a%2Fb``, or unescaped)."""
        df = Q.dialogue(store, split, dialogue_id, dataset)
        rows = Q.to_records(df.drop("predictions"))
        for row, preds in zip(rows, df["predictions"].to_list()):
            row["predictions"] = Q.prediction_records(preds)
        return {"split": split, "dialogue_id": dialogue_id, "utterances": rows}

    @app.post(
        "/predict",
        summary="Predict the emotion of each utterance of a new dialogue",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["dialogue"],
                "properties": {
                    "dialogue": {"type": "string", "description": "The JSON body above, as a string"},
                    "audio_0": {"type": "string", "format": "binary", "description": "Audio of utterance 0 (any audio_<i>)"},
                    "video_0": {"type": "string", "format": "binary", "description": "Video of utterance 0 (any video_<i>)"},
                },
            }},
        }}},
    )
    async def predict(request: Request) -> dict:
        """Runs the extractors of the run's feature sets and the run's model (default: the newest run).

        Send JSON ``{"utterances": [{"speaker", "text"}], "run"}``, or the same JSON in the form field
        ``dialogue`` of a multipart request with media files ``audio_<i>`` / ``video_<i>`` for
        utterance ``i``. Returns label, probabilities, behaviour description and transcript per utterance.
        """
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("application/json", "multipart/form-data"):
            raise HTTPException(415, f"send application/json or multipart/form-data, not {ctype or 'no content type'!r}")
        max_files = 2 * limits.max_utterances
        # the body first, within the receive timeout; only then does the request take a place in the queue
        try:
            if ctype == "application/json":
                received = await asyncio.wait_for(request.body(), limits.receive_timeout_s)
            else:
                received = await asyncio.wait_for(request.form(max_files=max_files, max_fields=max_files + 4), limits.receive_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("/predict from %s: body not received within %.0f s; answered 408", _client(request), limits.receive_timeout_s)
            return JSONResponse({"detail": f"the request body did not arrive within {limits.receive_timeout_s:g} s"},
                                status_code=408, headers={"Connection": "close"})
        except ClientDisconnect:
            log.warning("/predict from %s: the client disconnected before sending its whole body", _client(request))
            return Response(status_code=400)  # nobody reads it
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            with admission.enter(media=ctype == "multipart/form-data"), tempfile.TemporaryDirectory(prefix="bemerc-upload-") as tmp:
                if ctype == "application/json":
                    body = _parse_request(received, limits)
                    uploads: dict[tuple[str, int], Path] = {}
                else:
                    dialogue_field = received.get("dialogue")
                    if not isinstance(dialogue_field, str):
                        raise HTTPException(422, "multipart requests need a form field 'dialogue' holding the JSON body")
                    body = _parse_request(dialogue_field.encode(), limits)
                    uploads = await _save_uploads(received, len(body.utterances), Path(tmp), limits)
                return await run_in_threadpool(predictor.predict, body, uploads, deadline)
        finally:
            if ctype == "multipart/form-data":
                await received.close()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")
    return app


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers: a connection that has not sent a
    request's whole header block ``header_timeout_s`` after its first byte is closed (one log line),
    so clients trickling headers cannot hold connections for ever. Bodies are bounded in the app.
    Use with :func:`server_config`."""

    header_timeout_s = ServeLimits.receive_timeout_s

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_cycle = self.cycle  # a new cycle object: the next request's headers are complete
        self._awaiting_headers = True

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers and self._header_timer is None:  # the first bytes of a request
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        super().data_received(data)
        if self.cycle is not self._seen_cycle:
            self._seen_cycle, self._awaiting_headers = self.cycle, False
            self._cancel_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._awaiting_headers = True  # a kept-alive connection: the next request gets its own deadline

    def connection_lost(self, exc) -> None:  # type: ignore[override]
        self._cancel_timer()
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            peer = self.transport.get_extra_info("peername")
            log.warning("%s: request headers not received within %.0f s; connection closed",
                        f"{peer[0]}:{peer[1]}" if peer else "a client", self.header_timeout_s)
            self.transport.close()


def server_config(app: FastAPI, limits: ServeLimits = ServeLimits(), **kwargs):
    """The ``uvicorn.Config`` that serves ``app`` with ``limits``' header deadline (h11 with
    :class:`TimedH11Protocol`); ``kwargs`` go to uvicorn (host, port, log_level, ...)."""
    import uvicorn

    protocol = type("TimedH11", (TimedH11Protocol,), {"header_timeout_s": limits.receive_timeout_s})
    return uvicorn.Config(app, http=protocol, **kwargs)


class HostCheck:
    """Which ``Host`` headers the server answers: the bound address, the loopback names and
    ``allow_hosts``; when bound to every interface (``0.0.0.0``), also any IP address, since DNS
    rebinding needs a name. Anything else is a 400, so a page of another site that rebinds its name
    to this machine cannot reach the API."""

    def __init__(self, host: str, allow_hosts: tuple[str, ...] = ()):
        self.names = {_host_name(h) for h in (*LOOPBACK_NAMES, *allow_hosts)}
        self.any_ip = host in WILDCARD_HOSTS
        if not self.any_ip:
            self.names.add(_host_name(host))

    def allows(self, header: str) -> bool:
        name = _host_name(header)
        if name in self.names:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def refuse(self, request: Request) -> JSONResponse | None:
        header = request.headers.get("host", "")
        if self.allows(header):
            return None
        return JSONResponse({"detail": f"Host {header!r} is not a name of this server (start it with --allow-host NAME "
                                       "to answer that name)"}, status_code=400)


def _host_name(value: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``; ``"Example.COM.:80"`` -> ``"example.com"``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _foreign_origin(request: Request) -> JSONResponse | None:
    """A 403 for a state-changing or costly request (any method but GET/HEAD/OPTIONS) sent by a page
    of another origin: its ``Origin`` is not this server's scheme and Host, or the browser says
    ``Sec-Fetch-Site: cross-site``/``same-site``. Clients that are not browsers send neither."""
    if request.method in SAFE_METHODS:
        return None
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site", "").lower()
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    if origin is not None and origin.rstrip("/").lower() != own:
        return JSONResponse({"detail": f"cross-site request refused: Origin {origin!r} is not this server ({own})"}, status_code=403)
    if site in ("cross-site", "same-site"):
        return JSONResponse({"detail": f"cross-site request refused (Sec-Fetch-Site: {site})"}, status_code=403)
    return None


def _missing_token(request: Request, token: str | None) -> JSONResponse | None:
    """A 401 unless the request carries ``token`` (Bearer header, the page's cookie, or ``?token=`` on
    ``/``), compared in constant time."""
    if not token:
        return None
    auth = request.headers.get("authorization", "")
    candidates = [auth[7:].strip() if auth[:7].lower() == "bearer " else "", request.cookies.get(TOKEN_COOKIE, "")]
    if request.url.path == "/":
        candidates.append(request.query_params.get("token", ""))
    expected = token.encode()
    if any(hmac.compare_digest(c.encode(), expected) for c in candidates if c):
        return None
    return JSONResponse({"detail": "this server needs its access token: send 'Authorization: Bearer TOKEN' "
                                   "(or open /?token=TOKEN in the browser)"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


class Admission:
    """The bounded queue of ``/predict``: at most ``max_pending`` requests inside the server (running
    or waiting), of which at most ``max_media_pending`` upload media; one more is a 503 with
    ``Retry-After`` at once instead of a wait behind long work. Used from the event loop only."""

    def __init__(self, limits: ServeLimits):
        self.limits = limits
        self.pending = 0
        self.media_pending = 0

    @contextmanager
    def enter(self, media: bool):
        full = self.pending >= self.limits.max_pending
        if media and self.media_pending >= self.limits.max_media_pending:
            full = True
        if full:
            what = "requests with media" if media and not self.pending >= self.limits.max_pending else "requests"
            raise PredictError(503, f"the server is busy: the queue of /predict {what} is full; try again shortly",
                               self.limits.retry_after_s)
        self.pending += 1
        self.media_pending += media
        try:
            yield
        finally:
            self.pending -= 1
            self.media_pending -= media


def _parse_request(raw: bytes, limits: ServeLimits) -> PredictRequest:
    try:
        body = PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise HTTPException(422, _validation_message(exc)) from None
    if len(body.utterances) > limits.max_utterances:
        raise HTTPException(422, f"at most {limits.max_utterances} utterances per request, got {len(body.utterances)}")
    return body


def _validation_message(exc: ValidationError) -> str:
    """The first validation error as one line: where and what."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


async def _save_uploads(form, n_utterances: int, folder: Path, limits: ServeLimits) -> dict[tuple[str, int], Path]:
    """Write each uploaded file to ``folder`` under a server-chosen name and check it is real media."""
    uploads: dict[tuple[str, int], Path] = {}
    for name, value in form.multi_items():
        if name == "dialogue":
            continue
        if not isinstance(value, UploadFile):
            raise HTTPException(422, f"form field {name!r}: media must be uploaded as a file, not given as text or a path")
        kind, index = upload_slot(name, n_utterances)
        if (kind, index) in uploads:
            raise HTTPException(422, f"upload {name!r} is given twice")
        if value.size is not None and value.size > limits.max_upload_bytes:
            raise HTTPException(413, f"upload {name!r} is {value.size:,} bytes, over the limit of {limits.max_upload_bytes:,}")
        if value.size == 0:
            raise HTTPException(422, f"upload {name!r} is empty")
        path = folder / name
        with open(path, "wb") as out:
            while chunk := await value.read(1 << 20):
                out.write(chunk)
        await run_in_threadpool(check_media, path, kind, name, limits.max_media_s)
        uploads[(kind, index)] = path
    return uploads


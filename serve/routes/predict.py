"""``POST /predict``: receive the request (body within a deadline), hold a place in the bounded
queue, save and check the uploads, then let the app's :class:`~bemerc.serve.predict.Predictor` answer.

``/predict`` is bounded: media duration per utterance, requests waiting (503 with ``Retry-After``)
and time per request. A client must send its whole body within ``receive_timeout_s`` (408
otherwise; headers: :class:`~bemerc.serve.server.TimedH11Protocol`); a request counts against the
queue only once its body has arrived, so clients that trickle hold no slot, and one that drops is
logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from bemerc.serve.request import PredictError, PredictRequest, ServeLimits, parse_request
from bemerc.serve.uploads import save_uploads

log = logging.getLogger("uvicorn.error")  # where uvicorn logs: one line per dropped or slow client

router = APIRouter()


@router.post(
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
    state = request.app.state
    limits, admission, predictor = state.limits, state.admission, state.predictor
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
                body = parse_request(received, limits)
                uploads: dict[tuple[str, int], Path] = {}
            else:
                dialogue_field = received.get("dialogue")
                if not isinstance(dialogue_field, str):
                    raise HTTPException(422, "multipart requests need a form field 'dialogue' holding the JSON body")
                body = parse_request(dialogue_field.encode(), limits)
                uploads = await save_uploads(received, len(body.utterances), Path(tmp), limits)
            return await run_in_threadpool(predictor.predict, body, uploads, deadline)
    finally:
        if ctype == "multipart/form-data":
            await received.close()


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"



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

"""What a ``POST /predict`` request is: its JSON body, the limits it is held to, and the error it
gets when it cannot be served.

The body names no server file: text comes as JSON, media only as uploaded bytes (see
:mod:`bemerc.serve.uploads`); a key that would name a file by path is refused.

>>> parse_request(b'{"utterances": [{"speaker": "Ross", "text": "Hi!"}]}', ServeLimits()).utterances[0].text
'Hi!'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bemerc.store import schema as S

# Keys that would name a media file by path inside the JSON body: refused, media must be uploaded.
PATH_KEYS = {"audio", "video", "audio_path", "video_path", "path", "file", "media", "url"}


class PredictError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, ``str()`` the message and
    ``retry_after_s`` (503 only) when to try again."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(message)


class PredictUtterance(BaseModel):
    """One turn of the dialogue. Media for turn ``i`` is uploaded as ``audio_i`` / ``video_i``."""

    model_config = ConfigDict(extra="forbid")
    speaker: str | None = Field(None, max_length=200)
    text: str | None = Field(None, max_length=S.MAX_TEXT_CHARS)  # the limit of every entry point (manifests too)

    @model_validator(mode="before")
    @classmethod
    def _no_paths(cls, data: Any) -> Any:
        if isinstance(data, dict):
            named = sorted(PATH_KEYS & set(data))
            if named:
                raise ValueError(
                    f"field {named[0]!r} is not accepted: media is never read from a path or URL; upload it as a "
                    "multipart file named audio_<index> or video_<index> with the JSON in the form field 'dialogue'"
                )
        return data


class PredictRequest(BaseModel):
    """``{"utterances": [{"speaker": ..., "text": ...}, ...], "run": RUN_ID}``; run defaults to the newest."""

    model_config = ConfigDict(extra="forbid")
    utterances: list[PredictUtterance] = Field(..., min_length=1)
    run: str | None = Field(None, max_length=200)


@dataclass(frozen=True)
class ServeLimits:
    """What one ``/predict`` request may ask for, and how many may wait.

    Sizes bound the upload; ``max_media_s`` bounds the work (checked on the container's header, then on
    what the upload decodes to, before any extractor runs);
    ``max_pending`` / ``max_media_pending`` bound the queue (more gets 503 with ``Retry-After``);
    ``request_timeout_s`` bounds one request's wall time, waiting included (503 when it could not
    start in time, 504 when its own work ran over).
    """

    max_upload_bytes: int = 50 * 1024 * 1024  # per file
    max_request_bytes: int = 200 * 1024 * 1024  # the whole request body
    max_utterances: int = 64
    max_media_s: float = 60.0  # duration of one uploaded file (one utterance)
    max_pending: int = 16  # /predict requests in the server at once, running or waiting
    max_media_pending: int = 2  # of those, requests that upload media (their work is long)
    request_timeout_s: float = 120.0
    receive_timeout_s: float = 30.0  # to receive a request's headers and its whole body (a slow client is cut off)
    retry_after_s: int = 10  # what a 503 tells the client


def parse_request(raw: bytes, limits: ServeLimits) -> PredictRequest:
    """The request body ``raw`` (JSON) checked against the model and ``limits``; a 422 naming the first problem."""
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


"""How uvicorn serves the app: request headers under a deadline (bodies are bounded in the app).

>>> uvicorn.Server(server_config(create_app("store"), host="127.0.0.1", port=8000)).run()   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from bemerc.serve.request import ServeLimits

log = logging.getLogger("uvicorn.error")  # where uvicorn logs: one line per slow client


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

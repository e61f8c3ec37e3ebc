"""Who may drive the server: the checks every request passes before any route runs.

Other web pages cannot drive the server: a request whose ``Host`` is not the bound address or a
configured name is refused (400, against DNS rebinding), a POST whose ``Origin`` is another site is
refused (403, against cross-site requests), and with an access token every request must carry it
(``Authorization: Bearer TOKEN``, or the cookie set by opening ``/?token=TOKEN``; 401 otherwise).
Every answer says ``nosniff`` and, but for the API docs, a same-origin content security policy.

>>> HostCheck("127.0.0.1").allows("localhost:8000"), HostCheck("127.0.0.1").allows("evil.example")
(True, False)
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
TOKEN_COOKIE = "bemerc_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Guard:
    """The app's HTTP middleware (``app.middleware("http")(Guard(hosts, token))``): refuses a request
    from a foreign ``Host`` or ``Origin`` or without ``token``, turns ``/?token=TOKEN`` into the
    page's cookie, and adds the security headers to every answer."""

    def __init__(self, hosts: "HostCheck", token: str | None = None):
        self.hosts = hosts
        self.token = token

    async def __call__(self, request: Request, call_next):
        token = self.token
        refused = self.hosts.refuse(request) or foreign_origin(request) or missing_token(request, token)
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


def foreign_origin(request: Request) -> JSONResponse | None:
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


def missing_token(request: Request, token: str | None) -> JSONResponse | None:
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


"""The FastAPI app: OpenAI routes, `/health`, `/metrics`, the web chat page, API keys, body
limit, CORS, errors.

Everything a client can get wrong is answered in OpenAI's error shape with a 4xx status; an
unexpected failure is logged and answered 500 in the same shape, and the server stays up.
The Host check, CORS (only with --allowed-origins), API keys, the content type and the body
limit are plain ASGI middlewares (in that order), so they run before any route reads the body;
keys are compared in constant time (hmac.compare_digest) and never logged.

Browsers are kept out of a keyless local server: a page elsewhere may POST to 127.0.0.1 without
asking first only with a "simple" content type (text/plain, forms), so every POST must be
`application/json` (415 otherwise), which makes a browser ask first, and no CORS header says
yes unless `--allowed-origins` names the page's origin (then that page, and only it, may call
the API; the Host check still applies, and an API key still guards a server that has one). A page on a name the attacker controls that resolves to 127.0.0.1 (DNS rebinding)
sends its own name as Host: a server bound to a loopback address answers only Host headers that
name it (localhost, 127.0.0.1, [::1] or the bound address, with its port), API key or not, since
a loopback server has no other legitimate name. Bound to another address (`--host`), it is
meant to be reached under names it cannot know, so Host is not checked there: an API key is
what guards it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from camelid.serve.access import check_origins, is_loopback
from camelid.serve.chat_api import router as chat_router
from camelid.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from camelid.serve.metrics import Metrics, RequestCounter

from camelid.serve.openai_api import SSE_KEEPALIVE_S, ClientGone, router
from camelid.serve.protocol import MAX_BODY_BYTES, APIError
from camelid.serve.registry import ModelRegistry

log = logging.getLogger("camelid.serve")
STATIC = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; say so to the browser (no CDN, no inline script).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PROTECTED_PREFIX = "/v1/"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
JSON_TYPE = b"application/json"
DEFAULT_HTTP_PORT = 80
CORS_MAX_AGE_S = 600
"""How long a browser may cache a preflight's answer."""
MAX_ECHOED_PATH = 100
"""Longest path quoted back in a 404 or 405."""


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/ routes when keys are set; 401 otherwise."""

    def __init__(self, app, keys: Iterable[str]):
        self.app = app
        # Compare fixed-length digests, so the time taken reveals neither a key nor its length.
        self.digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def _valid(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        digest = hashlib.sha256(token.strip()).digest()
        ok = False
        for key in self.digests:  # check every key, so timing does not reveal which one matched
            ok |= hmac.compare_digest(digest, key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.digests and scope["path"].startswith(PROTECTED_PREFIX):
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not self._valid(header):
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await _send_error(send, err)
        await self.app(scope, receive, send)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class HostCheckMiddleware:
    """403 unless the Host header names this loopback server: one of `names` with the port the
    request came in on (scope["server"]). Guards against DNS rebinding."""

    def __init__(self, app, names: Iterable[str]):
        self.app = app
        self.names = {n.lower() for n in names}

    def _valid(self, host: bytes | None, port: int | None) -> bool:
        try:
            text = (host or b"").decode("ascii").lower()
        except UnicodeDecodeError:
            return False
        name, sep, given = text.rpartition(":") if text.rfind(":") > text.rfind("]") else (text, "", "")
        if sep and not (given.isdigit() and len(given) <= 5):
            return False
        return name in self.names and (int(given) if given else DEFAULT_HTTP_PORT) == port

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            server = scope.get("server")
            if not self._valid(_header(scope, b"host"), server[1] if server else None):
                err = APIError(403, "the Host header does not name this server: it is bound to a loopback address and "
                                    "answers only localhost, 127.0.0.1, [::1] or that address, with its port (bind --host "
                                    "to serve other names)", code="invalid_host")
                return await _send_error(send, err)
        await self.app(scope, receive, send)


class JSONContentTypeMiddleware:
    """415 for a POST whose Content-Type is not application/json (a browser may send text/plain
    or form bodies cross-site without asking; JSON makes it ask, and the answer is no)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            ctype = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if ctype != JSON_TYPE:
                err = APIError(415, "the request body must be JSON: send `Content-Type: application/json`",
                               code="unsupported_media_type")
                return await _send_error(send, err)
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes, by its Content-Length or, when chunked, as it arrives."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, too_big)
        # Read the body here (it is at most `limit` bytes) and replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, too_big)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(registry: ModelRegistry, api_keys: Iterable[str] = (), max_body_bytes: int = MAX_BODY_BYTES,
               host: str = "127.0.0.1", allowed_origins: Iterable[str] = (),
               sse_keepalive_s: float = SSE_KEEPALIVE_S) -> FastAPI:
    """The app for `registry`; `host` is the address the server binds (loopback: Host checked);
    `allowed_origins` are the web origins whose pages may call the API (CORS; none by default);
    a stream waiting for its first token gets an SSE comment every `sse_keepalive_s`."""
    app = FastAPI(title="camelid", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry = registry
    app.state.sse_keepalive_s = sse_keepalive_s
    metrics = Metrics(list(registry))
    for m in {id(m.scheduler): m for m in registry}.values():  # adapters may share one scheduler
        m.scheduler.observers.append(metrics.observer(m.name))
    app.include_router(router)
    app.include_router(chat_router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return _error_response(err)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, err: ClientGone):
        # Nobody reads this; 499 is nginx's "client closed request".
        return JSONResponse({}, status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        path = request.url.path if len(request.url.path) <= MAX_ECHOED_PATH else request.url.path[:MAX_ECHOED_PATH] + "..."
        message = f"no route {request.method} {path}" if err.status_code in (404, 405) else str(err.detail)
        return _error_response(APIError(err.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return _error_response(APIError(422, str(err.errors()[0].get("msg", err)), code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(err).__name__}", type="server_error"))

    @app.get("/health")
    async def health():
        """Liveness and load: 200 while every scheduler thread runs, else 503."""
        stats = {m.name: m.scheduler.stats() for m in registry}
        schedulers = {id(m.scheduler): stats[m.name] for m in registry}.values()  # adapters may share one
        ok = all(s["alive"] for s in schedulers)
        body = {"status": "ok" if ok else "unhealthy",
                "active_requests": sum(s["active_requests"] for s in schedulers), "models": stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        """Prometheus' text format (see serve/metrics.py); open like /health."""
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # The last added runs first: request counter, Host, CORS, API key, content type, body limit.
    # CORS answers a preflight before the key check (a browser sends no credentials with it)
    # and adds its headers to every answer, refusals included, so the page can read them.
    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    app.add_middleware(JSONContentTypeMiddleware)
    app.add_middleware(APIKeyMiddleware, keys=list(api_keys))
    origins = check_origins(allowed_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=CORS_MAX_AGE_S)
    if is_loopback(host):
        bound = f"[{host}]" if ":" in host else host
        app.add_middleware(HostCheckMiddleware, names=(*LOOPBACK_NAMES, bound))
    app.add_middleware(RequestCounter, metrics=metrics)
    return app


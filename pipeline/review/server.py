"""The review page's server: a Starlette app over one committed run and the reviews table.

The browser gets product ids, categories and scores, never an image URI or a path: a thumbnail
is asked for by product id, read by the server through the job's URI policy
(`engine.ImageSettings.fetch`) and sent as a small JPEG. A decision is appended to the reviews
table (`pipeline.sinks.reviews`) before the request answers, so "saved" on the page means the
file is on disk (or the object is in the store). Routes:

- `GET /` the page (`?token=` once sets the cookie), `GET /static/{page.js,page.css}`
- `GET /api/meta` run, model classes and coarse groups, reasons, counts
- `GET /api/queue?offset&limit&reason&category&group&pending` queue items, worst first
- `GET /api/thumb?id=` and `GET /api/iconic?category=` JPEG thumbnails
- `POST /api/decisions {product_id, category}`, `POST /api/bulk {reason, category, group,
  expect}` (each filtered item's top-1), `POST /api/undo {decision_ids}`
"""

from __future__ import annotations

import hmac
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.config.review import LOCAL_HOSTS, ReviewConfig
from pipeline.errors import ConfigError
from pipeline.review.routes import Routes
from pipeline.review.state import ReviewState

COOKIE = "review_token"


class TokenGate:
    """Every request carries the token (Authorization: Bearer, or the cookie that `/?token=`
    sets), or gets 401 before any route runs. Plain ASGI: no per-request task overhead."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app, self.token = app, token

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if request.url.path == "/" and "token" in query:
            if not self._ok(query["token"][0]):
                await Response("wrong token\n", 401, media_type="text/plain")(scope, receive, send)
                return
            # Off the address bar (and its history) at once: the cookie carries it from here.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        if not self._ok(given):
            await JSONResponse({"error": "missing or wrong token: open the page as /?token=TOKEN "
                                "or send Authorization: Bearer TOKEN"}, 401)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(state: ReviewState) -> Starlette:
    """The Starlette app over `state`: the routes behind the token gate."""
    middleware = [Middleware(TokenGate, token=state.cfg.token)]
    if state.cfg.is_local:
        # A loopback page must not answer a page of another site that rebinds its name to
        # 127.0.0.1 (DNS rebinding): only loopback Host headers.
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=[*LOCAL_HOSTS, "[::1]"]))
    return Starlette(routes=Routes(state).table(), middleware=middleware)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or ConfigError naming --host/--port and the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
                          "choose another --port (0: any free one)") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def page_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def _uvicorn(state: ReviewState) -> Any:
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning",
                                         access_log=False, lifespan="off"))


def serve(cfg: ReviewConfig, ready: Callable[[str, ReviewState], None] | None = None) -> None:
    """Build the state (refusing bad arguments first), listen, call `ready(url, state)`, then
    serve until interrupted."""
    state = ReviewState(cfg)
    sock = listen(cfg.host, cfg.port)
    server = _uvicorn(state)
    if ready:
        ready(page_url(sock, cfg.host), state)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()



@dataclass
class RunningServer:
    """A review server on a thread of this process (tests, benchmarks, the screenshot)."""

    url: str
    state: ReviewState
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(cfg: ReviewConfig) -> RunningServer:
    """Serve `cfg` on a daemon thread; returns once the server accepts connections."""
    import time

    state = ReviewState(cfg)
    sock = listen(cfg.host, cfg.port)
    server = _uvicorn(state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the review server did not start")
        time.sleep(0.02)
    return RunningServer(page_url(sock, cfg.host), state, server, thread)

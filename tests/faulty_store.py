"""A misbehaving object store: an HTTP proxy on 127.0.0.1 in front of an S3 server (moto).

On a set share of requests it injects one fault, taking the kinds in turn so that every kind
occurs once there are a few faults:
- `slowdown`: 503 with S3's SlowDown error body (throttling), the request not forwarded;
- `internal`: 500 with S3's InternalError body, the request not forwarded;
- `delay`: the request is forwarded after DELAY_S;
- `reset`: the request is forwarded (it takes effect on the server), then the connection is
  reset before the answer, as when a load balancer drops it: the client cannot tell whether
  its write happened.
A rule can also make every request matching a method and a path suffix fail, to count how
many times a client tries. Used by tests/integration/test_faulty_store.py and benchmarks/faulty_store.py.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

FAULT_KINDS = ("slowdown", "internal", "delay", "reset")
DELAY_S = 0.5
UPSTREAM_TIMEOUT_S = 30.0
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own; everything else is passed on as is
# (the Host header included: it is part of the request's signature).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length",
              "server", "date"}  # the last three: set by this proxy's own reply
ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
              '<Message>{message}</Message><RequestId>FAULTPROXY</RequestId></Error>')
ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
          "internal": (500, "InternalError",
                       "We encountered an internal error. Please try again.")}


@dataclass
class FailRule:
    """Every request with this method whose path ends with `suffix` gets fault `kind`."""

    method: str
    suffix: str
    kind: str = "internal"


@dataclass
class Stats:
    requests: int = 0
    faults: Counter = field(default_factory=Counter)
    rule_hits: int = 0


class FaultProxy:
    """The proxy; `url` is the endpoint to give S3 clients (AWS_ENDPOINT_URL)."""

    def __init__(self, upstream: str, share: float, seed: int = 0,
                 rule: FailRule | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.share = share
        self.rule = rule
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

            def finish(self) -> None:
                with contextlib.suppress(OSError):  # a connection this proxy reset on purpose
                    super().finish()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # resets end requests mid-way by design
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _choose(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats.requests += 1
            if self.rule and method == self.rule.method and path.split("?")[0].endswith(
                    self.rule.suffix):
                self.stats.rule_hits += 1
                return self.rule.kind
            if self._rng.random() >= self.share:
                return None
            kind = FAULT_KINDS[sum(self.stats.faults.values()) % len(FAULT_KINDS)]
            self.stats.faults[kind] += 1
            return kind

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        body = _read_body(req)
        kind = self._choose(req.command, req.path)
        if kind in ERRORS:
            status, code, message = ERRORS[kind]
            _reply(req, status, {"Content-Type": "application/xml"},
                   ERROR_BODY.format(code=code, message=message).encode(),
                   head=req.command == "HEAD")
            return
        if kind == "delay":
            time.sleep(DELAY_S)
        status, headers, answer = self._forward(req, body)
        if kind == "reset":
            # SO_LINGER 0: close() sends RST, not FIN, and drops the unsent answer.
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.connection.close()
            req.close_connection = True
            return
        _reply(req, status, headers, answer, head=req.command == "HEAD")

    def _forward(self, req: http.server.BaseHTTPRequestHandler,
                 body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            answer = response.read()
            headers = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            if req.command == "HEAD" and response.getheader("Content-Length") is not None:
                headers["Content-Length"] = response.getheader("Content-Length")
            return response.status, headers, answer
        finally:
            conn.close()


def _read_body(req: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request body, by Content-Length or HTTP chunked transfer encoding."""
    if "chunked" in req.headers.get("Transfer-Encoding", "").lower():
        parts = []
        while True:
            size = int(req.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while req.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(req.rfile.read(size))
            req.rfile.readline()
    length = int(req.headers.get("Content-Length") or 0)
    return req.rfile.read(length) if length else b""


def _reply(req: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str],
           body: bytes, head: bool = False) -> None:
    req.send_response(status)
    for name, value in headers.items():
        req.send_header(name, value)
    if not head or "Content-Length" not in headers:
        req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    if not head:
        req.wfile.write(body)

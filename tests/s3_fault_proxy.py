"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto: tests/s3_server.py).

Requests are relayed byte for byte (request line, headers in order with ``Host`` untouched, as
SigV4 signs it, and the body) unless a ``Rule`` matches; a rule answers its next ``times``
matching requests with a fault instead:

- ``error``: an S3 error response (500 InternalError, or 503 SlowDown) without forwarding;
- ``hang``: read the request, then wait ``delay_s`` (beyond the client's read timeout) and
  close the connection without forwarding, so a timed-out request never reaches the store;
- ``drop``: forward the headers and the first ``fraction`` of the body to the store, then
  reset both connections: the store went away in the middle of a write.

``stop()`` takes the whole endpoint away (connection refused); ``start()`` brings it back on
the same port. Every request the proxy receives is logged in ``requests``.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

ERROR_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclass
class Rule:
    """A fault for requests whose method is ``method`` (any when None) and whose path (with
    query) matches the regular expression ``path``; ``times`` None means every one."""

    action: Literal["error", "hang", "drop"]
    method: str | None = None
    path: str = ""
    times: int | None = None
    status: int = 500
    delay_s: float = 5.0
    fraction: float = 0.5
    matched: int = 0  # requests this rule has answered with its fault
    forwarded: int = 0  # body bytes that ``drop`` let through to the store, all requests

    def applies(self, method: str, path: str) -> bool:
        if self.method not in (None, method) or not re.search(self.path, path):
            return False
        return self.times is None or self.matched < self.times


@dataclass
class S3FaultProxy:
    """The proxy for ``upstream`` (``http://host:port``); ``url`` is its own endpoint."""

    upstream: str
    rules: list[Rule] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _open: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def count(self, method: str, path: str = "") -> int:
        """Requests received with ``method`` whose path matches ``path``."""
        with self._lock:
            return sum(m == method and bool(re.search(path, p)) for m, p in self.requests)

    def _fault_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests.append((method, path))
            for rule in self.rules:
                if rule.applies(method, path):
                    rule.matched += 1
                    return rule
        return None

    def start(self) -> None:
        proxy = self

        class Handler(_RelayHandler):
            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._open.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._open.discard(self.connection)
                super().finish()

            def fault_for(self, method: str, path: str) -> Rule | None:
                return proxy._fault_for(method, path)

            def upstream(self) -> str:
                return proxy.upstream

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening and cut the connections the client keeps open."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the handler blocked reading it
                except OSError:
                    pass
            self._open.clear()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset rather than an orderly end: the peer sees the connection die."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def fault_for(self, method: str, path: str) -> Rule | None:
        raise NotImplementedError

    def upstream(self) -> str:
        raise NotImplementedError

    def log_message(self, format, *args) -> None:
        """Quiet: pytest shows the test's own output, not one line per request."""

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body as it arrives, raw (chunked framing relayed as is)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                yield line
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline()
                        yield trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                yield self.rfile.read(size + 2)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _handle(self) -> None:
        rule = self.fault_for(self.command, self.path)
        if rule is None or rule.action == "drop":
            self._forward(rule)
            return
        for _ in self._body_chunks():
            pass
        if rule.action == "hang":
            time.sleep(rule.delay_s)
            self.close_connection = True
            return
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{ERROR_CODES[rule.status]}'
            f"</Code><Message>injected by s3_fault_proxy</Message></Error>"
        ).encode()
        self.send_response(rule.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self, rule: Rule | None) -> None:
        target = urlsplit(self.upstream())
        connection = HTTPConnection(target.hostname, target.port, timeout=60)
        connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        total = int(self.headers.get("Content-Length") or 0)
        sent = 0
        for chunk in self._body_chunks():
            if rule is not None and sent + len(chunk) >= total * rule.fraction:
                keep = max(0, int(total * rule.fraction) - sent)
                connection.sock.sendall(chunk[:keep])
                rule.forwarded += sent + keep
                _reset(connection.sock)
                _reset(self.connection)
                self.close_connection = True
                return
            connection.sock.sendall(chunk)
            sent += len(chunk)
        response = connection.getresponse()
        body = response.read()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                self.send_header(name, value)
        length = response.getheader("Content-Length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length
                         else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        connection.close()


@contextmanager
def fault_proxy(upstream: str) -> Iterator[S3FaultProxy]:
    """A started proxy for ``upstream``, stopped on exit."""
    proxy = S3FaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()

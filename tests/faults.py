"""Fault injection helpers: loopback HTTP servers that misbehave on purpose."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    behaviour = "401-echo"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.server.behaviour == "silent":  # type: ignore[attr-defined]
            self.server.stop.wait(60)  # type: ignore[attr-defined]
            return
        auth = self.headers.get("Authorization", "")
        body = f'{{"error": {{"message": "invalid api key {auth.removeprefix("Bearer ")}", "code": 401}}}}'.encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def http_server(behaviour: str) -> Iterator[str]:
    """`401-echo`: every request gets 401 with the Authorization key echoed in the body;
    `silent`: accepts, reads the request, never replies. Yields the base URL."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.behaviour = behaviour  # type: ignore[attr-defined]
    srv.stop = threading.Event()  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.stop.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""A local HTTP server that the fuzz mode's image URLs point at (the launched server runs with
`--allow-private-media-urls`): every hostile image by name, and hostile responses (a redirect loop, a body that
trickles in slower than the fetch timeout, a lying Content-Length, a gzip bomb, a 500, a connection closed early).
"""
from __future__ import annotations

import contextlib
import gzip
import threading
import time
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from benchmarks.reliability.hostile_images import images

SPECIAL = ("redirect-loop", "redirect-away", "slow", "huge-length", "gzip-bomb", "error-500", "close-early",
           "not-found")


@cache
def _bodies() -> dict[str, bytes]:
    return {name: data for name, _, data in images()}


@cache
def _gzip_bomb() -> bytes:
    return gzip.compress(b"\x00" * (32 << 20), compresslevel=9, mtime=0)  # 32 MiB of zeros in ~32 KiB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        name = self.path.strip("/").partition("?")[0]
        special = getattr(self, f"_{name.replace('-', '_')}", None) if name in SPECIAL else None
        if special is not None:
            return special()
        body = _bodies().get(name)
        if body is None:
            return self._send(404, b"not found")
        self._send(200, body, {"Content-Type": "image/png"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in ({"Content-Length": str(len(body))} | (headers or {})).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect_loop(self) -> None:
        self._send(302, b"", {"Location": "/redirect-loop"})

    def _redirect_away(self) -> None:  # to a port nothing listens on
        self._send(302, b"", {"Location": "http://127.0.0.1:9/x.png"})

    def _slow(self) -> None:
        """One byte every half second, for at most 6 s (the launched server's fetch timeout is 2 s)."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(12):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(0.5)
        self.close_connection = True

    def _huge_length(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(_bodies()["png-1x1"])
        self.close_connection = True

    def _gzip_bomb(self) -> None:
        self._send(200, _gzip_bomb(), {"Content-Encoding": "gzip", "Content-Type": "image/png"})

    def _error_500(self) -> None:
        self._send(500, b"boom")

    def _close_early(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5000")
        self.end_headers()
        self.wfile.write(b"\x89PNG\r\n")
        self.close_connection = True

    def _not_found(self) -> None:
        self._send(404, b"")


@contextlib.contextmanager
def image_host() -> Iterator[str]:
    """Yield the base URL of the image host (127.0.0.1, a free port); stop it on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fuzz-image-host", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def urls(base: str) -> list[tuple[str, str]]:
    """(name, URL) for every image and every hostile response the host serves."""
    return [(f"http-{name}", f"{base}/{name}") for name in (*_bodies(), *SPECIAL)]

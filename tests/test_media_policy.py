"""Image URLs may not reach the server's own network unless the operator allows it."""
from __future__ import annotations

import asyncio
import http.server
import threading

import pytest

from images import image_bytes, make_image
from runtime.server.config import Limits
from runtime.server.errors import MediaNotAllowed
from runtime.server.media import MediaLoader


@pytest.fixture
def local_image_url():
    png = image_bytes(make_image("red", (32, 32)))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/hop":
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/img.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", png
    httpd.shutdown()


async def _read(loader: MediaLoader, url: str) -> bytes:
    try:
        return await loader.read(url)
    finally:
        await loader.aclose()


@pytest.mark.parametrize("path", ["/img.png", "/hop"])
def test_internal_addresses_refused_by_default(local_image_url, path):
    """(Offline there is no public host to redirect from; the check runs on every request, redirects too.)"""
    base, _ = local_image_url
    with pytest.raises(MediaNotAllowed, match="internal address"):
        asyncio.run(_read(MediaLoader(Limits(), (), allow_remote=True), base + path))
    localhost = base.replace("127.0.0.1", "localhost")
    with pytest.raises(MediaNotAllowed):
        asyncio.run(_read(MediaLoader(Limits(), (), allow_remote=True), localhost + path))


def test_operator_may_allow_private_urls(local_image_url):
    base, png = local_image_url
    loader = MediaLoader(Limits(), (), allow_remote=True, allow_private=True)
    assert asyncio.run(_read(loader, base + "/hop")) == png

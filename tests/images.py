"""Small synthetic test images with some structure (not blank), deterministic."""
from __future__ import annotations

import contextlib
import http.server
import io
import threading
from typing import Iterator

from PIL import Image, ImageDraw


def make_image(color: str | tuple[int, int, int] = "red", size: tuple[int, int] = (224, 224)) -> Image.Image:
    """A `size` (width, height) RGB image: `color` background with a white disc and a dark bar."""
    w, h = size
    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill="white")
    draw.rectangle((w // 2, h * 5 // 8, w * 7 // 8, h * 3 // 4), fill=(20, 20, 20))
    draw.line((0, h - 1, w - 1, 0), fill="yellow", width=max(1, w // 64))
    return img


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_gif(colors: tuple[str, ...] = ("red", "blue"), size: tuple[int, int] = (64, 48)) -> bytes:
    """An animated GIF whose frames are `make_image(color)` for each color."""
    frames = [make_image(c, size) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@contextlib.contextmanager
def serve_image(data: bytes) -> Iterator[str]:
    """A local HTTP server for one image: its base URL. Any path gets the image, except `/hop`, which
    redirects to `/img.png`."""

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
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()

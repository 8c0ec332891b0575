"""Shared bits of the example programs: pick a backend from the command line, draw demo images."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import epdlang as epd  # noqa: E402


def backend_from_args(description: str) -> epd.Backend:
    """`--url URL` talks to a server: an epdlang server (`epd serve`) through `epd.RuntimeEndpoint`, any other
    OpenAI-compatible one through the degraded `epd.OpenAI`. Default: the embedded trained shapes model
    (docs/shapes_model.md); `--model DIR` another checkpoint."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="server URL, e.g. http://127.0.0.1:30000 for epd serve (a trailing /v1 is "
                                      "fine), or another server's OpenAI base URL such as http://host:8000/v1")
    parser.add_argument("--model", default=None, help="model name (OpenAI server) or checkpoint dir (local)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    if args.url:
        return server_backend(args.url, args.model, args.api_key)
    return epd.Runtime(model=args.model)


def server_backend(url: str, model: str | None = None, api_key: str | None = None) -> epd.Backend:
    from epdlang.backends.endpoint import probe

    root = url.rstrip("/").removesuffix("/v1")
    if probe(root, api_key) is not None:
        return epd.RuntimeEndpoint(root, api_key=api_key)
    return epd.OpenAI(url, model=model or "default", api_key=api_key)


def scene_image(*shapes: tuple[str, str], background: str = "white", size: tuple[int, int] = (336, 224)):
    """A picture the shapes model was trained on: (color, shape) pairs, evenly spaced left to right."""
    from runtime.shapes.scene import Scene, Shape

    w, h = size
    side = min(w, h) // 4  # the sizes training draws for several shapes
    step = w // len(shapes)
    placed = tuple(Shape(kind, color, i * step + (step - side) // 2, (h - side) // 2, side)
                   for i, (color, kind) in enumerate(shapes))
    return Scene(w, h, background, placed).image()


def demo_image(color: str, label: str = "", size: tuple[int, int] = (112, 112)):
    """A small synthetic picture: a colored background, a white disc and an optional label."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((w // 8, h // 8, w // 2, h // 2), fill="white")
    if label:
        draw.text((4, h - 14), label, fill="black")
    return img

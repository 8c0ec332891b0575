"""Shared bits of the example programs: pick a backend from the command line, draw demo images."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import epdlang as epd  # noqa: E402


def backend_from_args(description: str) -> epd.Backend:
    """`--url URL [--model NAME]` talks to an OpenAI-compatible server; default: the embedded tiny model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="model name (server) or checkpoint dir (local)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    if args.url:
        return epd.OpenAI(args.url, model=args.model or "default", api_key=args.api_key)
    return epd.Runtime(model=args.model)


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

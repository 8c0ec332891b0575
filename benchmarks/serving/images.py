"""Seeded synthetic images with real content (shapes, text, gradients) and their data URLs.

Encoded once, before any clock starts; identical (size, seed) pairs give byte-identical data URLs,
so a server's content-hash caches see reused images as the same image.
"""
from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

WORDS = ("STOP", "EXIT", "OPEN", "SALE", "CAFE", "BUS 42", "MAIN ST", "PUSH", "7-ELEVEN", "NO PARKING")


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A two-colour diagonal gradient with mild noise, like a photo's smooth regions."""
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (np.add.outer(np.arange(h), np.arange(w)) / max(w + h - 2, 1))[..., None]
    arr = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 1))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _shapes(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1 = min(w - 1, x0 + int(rng.integers(8, max(9, w // 3))))
        y1 = min(h - 1, y0 + int(rng.integers(8, max(9, h // 3))))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.line((x0, y0, x1, y1), fill=fill, width=max(1, w // 100))


def _text(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    """Sign-like text boxes (TextCaps/TextVQA images are chosen for containing text)."""
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, max(1, w - 80))), int(rng.integers(0, max(1, h - 30)))
        word = WORDS[int(rng.integers(0, len(WORDS)))]
        draw.rectangle((x, y, x + 9 * len(word) + 8, y + 20), fill=(250, 250, 240), outline=(0, 0, 0))
        draw.text((x + 4, y + 4), word, fill=(200, 0, 0))


def make_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, width, height])
    img = _background(width, height, rng)
    draw = ImageDraw.Draw(img)
    _shapes(draw, width, height, rng)
    _text(draw, width, height, rng)
    return img


@lru_cache(maxsize=4096)
def image_data_url(width: int, height: int, seed: int, fmt: str = "JPEG") -> str:
    return pil_data_url(make_image(width, height, seed), fmt)


def pil_data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"

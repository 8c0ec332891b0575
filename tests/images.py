"""Small synthetic test images with some structure (not blank), deterministic."""
from __future__ import annotations

import io

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

"""Shared helpers for the offline benchmark scripts: synthetic images, prompts and result output."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synthetic_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random but deterministic picture: background, a few shapes and some text."""
    rng = random.Random(seed)
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    img = Image.new("RGB", size, colour())
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(6):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, min(w, x0 + rng.randrange(8, w // 2)), min(h, y0 + rng.randrange(8, h // 2)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour())
    draw.text((rng.randrange(w // 2), rng.randrange(h // 2)), f"item {seed}", fill=colour())
    return img


def text_of_tokens(tokenizer, n: int, seed: int) -> str:
    """A question of exactly n tokens for the given tokenizer."""
    rng = random.Random(seed)
    words = "what which where colour shape many picture object left right bigger small red blue".split()
    ids: list[int] = []
    while len(ids) < n:
        ids = tokenizer.encode(" ".join(rng.choice(words) for _ in range(n * 2)), add_special_tokens=False)
    return tokenizer.decode(ids[:n])


def image_request(img: Image.Image, question: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                      {"type": "text", "text": question}]}]}


def write_result(name: str, result: dict) -> Path:
    out_dir = ROOT / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path

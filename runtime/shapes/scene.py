"""Synthetic scenes of 1-3 coloured shapes, the questions asked about them and their true answers.

One generator serves training (`runtime.shapes.train`), the held-out accuracy benchmark (`epd bench
--dataset shapes`), the tests and the demo, so they all agree on what a scene and a right answer are.
Pure PIL and `random`: no torch.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
MIN_SIDE, MAX_SIDE = 112, 448
KINDS = ("color", "shape", "count", "exists", "describe", "json")
JSON_QUESTION = "List the shapes as JSON."
HELD_OUT_SEED = 1_000_003  # held-out sets draw from HELD_OUT_SEED + k; training draws from small seeds
JSON_SCHEMA = {
    "type": "object",
    "properties": {"shapes": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object",
        "properties": {"shape": {"enum": list(SHAPES)}, "color": {"enum": list(COLORS)}},
        "required": ["shape", "color"], "additionalProperties": False}}},
    "required": ["shapes"], "additionalProperties": False,
}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: int  # top-left corner and side of the bounding square, in pixels
    y: int
    size: int

    @property
    def center_x(self) -> float:
        return self.x + self.size / 2

    def draw(self, draw: ImageDraw.ImageDraw, fill) -> None:
        box = (self.x, self.y, self.x + self.size, self.y + self.size)
        if self.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif self.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(self.x + self.size / 2, self.y), (self.x + self.size, self.y + self.size),
                          (self.x, self.y + self.size)], fill=fill)


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str
    shapes: tuple[Shape, ...]  # left to right

    def image(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(img)
        for s in self.shapes:
            s.draw(draw, COLORS[s.color])
        return img


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str


def random_scene(rng: random.Random, width: int | None = None, height: int | None = None,
                 count: int | None = None) -> Scene:
    """A scene whose shapes do not overlap and whose centres are far enough apart to order left to right;
    `count` shapes, or 1-3 drawn uniformly."""
    width = width or rng.randrange(MIN_SIDE, MAX_SIDE + 1)
    height = height or rng.randrange(MIN_SIDE, MAX_SIDE + 1)
    for _ in range(1000):
        placed = _place(rng, width, height, count or rng.randint(1, 3))
        if placed is not None:
            return Scene(width, height, rng.choice(list(BACKGROUNDS)), placed)
    raise RuntimeError(f"could not place shapes in a {width}x{height} image")


def _place(rng: random.Random, width: int, height: int, n: int) -> tuple[Shape, ...] | None:
    side = min(width, height)
    shapes: list[Shape] = []
    for _ in range(n):
        for _ in range(50):
            size = rng.randint(max(24, side // 6), max(28, side * 2 // 5 if n == 1 else side // 3))
            if size >= width or size >= height:
                continue
            s = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.randrange(0, width - size),
                      rng.randrange(0, height - size), size)
            if all(_apart(s, t, side) for t in shapes):
                shapes.append(s)
                break
        else:
            return None
    return tuple(sorted(shapes, key=lambda s: s.center_x))


def _apart(a: Shape, b: Shape, side: int) -> bool:
    gap = max(4, side // 40)
    disjoint = (a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x
                or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y)
    return disjoint and abs(a.center_x - b.center_x) >= max(a.size, b.size) / 3


def describe(scene: Scene) -> str:
    parts = [f"a {s.color} {s.kind}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed[0].upper()}{listed[1:]} on a {scene.background} background."


def as_json(scene: Scene) -> str:
    """The compact JSON a schema-constrained answer takes (keys in the schema's order)."""
    shapes = [{"shape": s.kind, "color": s.color} for s in scene.shapes]
    return json.dumps({"shapes": shapes}, separators=(",", ":"))


def questions(scene: Scene) -> list[Question]:
    """Every question that has one right answer for this scene."""
    kinds = [s.kind for s in scene.shapes]
    colors = [s.color for s in scene.shapes]
    out = [Question("color", f"What color is the {s.kind}?", s.color) for s in scene.shapes if kinds.count(s.kind) == 1]
    out += [Question("shape", f"What shape is {s.color}?", s.kind) for s in scene.shapes if colors.count(s.color) == 1]
    out.append(Question("count", "How many shapes are there?", str(len(scene.shapes))))
    out += [Question("exists", f"Is there a {k}?", "yes" if k in kinds else "no") for k in SHAPES]
    out.append(Question("describe", "Describe the image.", describe(scene)))
    out.append(Question("json", JSON_QUESTION, as_json(scene)))
    return out


def is_correct(question: Question, reply: str) -> bool:
    """Exact answers, forgiving only surrounding whitespace, case and a final full stop on one-word answers;
    JSON is compared as parsed objects."""
    if question.kind == "json":
        try:
            return json.loads(reply) == json.loads(question.answer)
        except ValueError:
            return False
    if question.kind == "describe":
        return reply.strip() == question.answer
    return reply.strip().rstrip(".").lower() == question.answer


def held_out(seed: int, n: int) -> list[tuple[Scene, Question]]:
    """`n` (scene, question) pairs, question kinds in rotation so each kind gets about n/6."""
    rng = random.Random(seed)
    pairs: list[tuple[Scene, Question]] = []
    while len(pairs) < n:
        kind = KINDS[len(pairs) % len(KINDS)]
        scene = random_scene(rng)
        options = [q for q in questions(scene) if q.kind == kind]
        if options:
            pairs.append((scene, rng.choice(options)))
    return pairs

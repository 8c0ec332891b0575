"""From benchmark requests (OpenAI chat messages with inline images) to the shapes the simulator needs.

Each request is preprocessed as the API server would (so prompt and image-token counts are exact);
the arrival schedule is the one `epd bench` draws for the same rate, burstiness and seed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from runtime.planner.sim import SimRequest


@dataclass(frozen=True)
class Shape:
    image_tokens: tuple[int, ...]
    prompt_len: int
    output_len: int
    pixel_bytes: tuple[int, ...]
    front_ms: float

    def at(self, arrival_ms: float) -> SimRequest:
        return SimRequest(arrival_ms, self.image_tokens, self.prompt_len, self.output_len, self.pixel_bytes,
                          self.front_ms)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start, drawn exactly as benchmarks/serving/arrivals.py draws them."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def schedule(shapes: Sequence[Shape], rate: float, burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    return [s.at(t * 1000.0) for s, t in zip(shapes, arrival_times(len(shapes), rate, burstiness, seed))]


def prepare_all(processor: Any, messages: Sequence[Sequence[dict]]) -> tuple[list, dict[int, Any]]:
    """Each request preprocessed once, and one image per distinct image-token count (for profiling encode)."""
    prepared, images, seen = [], {}, {}
    for msgs in messages:
        p = seen.get(id(msgs)) or processor.prepare(list(msgs))  # a repeated request is prepared once
        seen[id(msgs)] = p
        prepared.append(p)
        for im in p.images:
            images.setdefault(im.num_tokens, im)
    return prepared, images


def shapes_of(messages: Sequence[Sequence[dict]], prepared: Sequence[Any], output_lens: Sequence[int],
              front: Callable[[str, list[dict], int], float]) -> list[Shape]:
    """`front(key, messages, num_images)` gives the API server's preprocessing ms of a request of that shape."""
    out = []
    for msgs, p, n_out in zip(messages, prepared, output_lens):
        tokens = tuple(im.num_tokens for im in p.images)
        key = f"{'+'.join(map(str, tokens)) or 'text'}/{-(-len(p.input_ids) // 64) * 64}"  # prompts to 64 tokens
        out.append(Shape(tokens, len(p.input_ids), n_out, tuple(im.pixel_values.nbytes for im in p.images),
                         front(key, list(msgs), len(tokens))))
    return out


def with_output(shapes: Sequence[Shape], output_len: int) -> list[Shape]:
    return [replace(s, output_len=output_len) for s in shapes]

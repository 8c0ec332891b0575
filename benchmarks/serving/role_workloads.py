"""Workloads that load one stage of the E -> P -> D pipeline more than the others.

- encode-heavy: 4 images of 448x448 per request, 8 output tokens (vision encoder and prefill bound).
- decode-heavy: 1 image of 112x112, 128 output tokens (decode bound; run with ignore_eos).
- mixed: both kinds, half and half, in a seeded shuffled order.

Every image in every request is distinct (its own seed), so a server's encoder cache never turns
an encode into a lookup; warm-up requests use other seeds than the measured ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.serving.workloads import BenchRequest, image_part, user, words

TEXT_WORDS = 12
MIXED_ENCODE_SHARE = 0.5


@dataclass(frozen=True)
class Shape:
    images: int
    side: int
    output_len: int


ENCODE_HEAVY = Shape(images=4, side=448, output_len=8)
DECODE_HEAVY = Shape(images=1, side=112, output_len=128)
WORKLOADS = ("encode-heavy", "decode-heavy", "mixed")


def shapes(name: str, n: int, rng: np.random.Generator) -> list[Shape]:
    if name == "encode-heavy":
        return [ENCODE_HEAVY] * n
    if name == "decode-heavy":
        return [DECODE_HEAVY] * n
    if name == "mixed":
        n_enc = round(n * MIXED_ENCODE_SHARE)
        ordered = [ENCODE_HEAVY] * n_enc + [DECODE_HEAVY] * (n - n_enc)
        return [ordered[int(j)] for j in rng.permutation(n)]
    raise ValueError(f"unknown workload {name!r}")


def request(shape: Shape, image_seed: int, rng: np.random.Generator, name: str) -> BenchRequest:
    imgs = [image_part((shape.side, shape.side), image_seed + k) for k in range(shape.images)]
    return BenchRequest((user(imgs, words(rng, TEXT_WORDS)),), shape.output_len, shape.images, name)


def build_role_workload(name: str, n: int, seed: int = 0) -> list[BenchRequest]:
    """`n` requests of workload `name`, deterministic in `seed`, images already encoded as data URLs."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    index = WORKLOADS.index(name)
    rng = np.random.default_rng([seed, index])
    base = (seed * len(WORKLOADS) + index) * 1_000_003  # image seeds of one workload never meet another's
    return [request(s, base + 8 * i, rng, name) for i, s in enumerate(shapes(name, n, rng))]

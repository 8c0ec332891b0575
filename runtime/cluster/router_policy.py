"""The router's records (a request in flight, an encode task, its view of an instance) and its choices, as
pure logic: which E encodes an image, which P prefills, which D decodes.

The router cannot see inside instances, so it keeps an approximate view built from what it sent them:
- per P/D instance, the page-sized prompt chunks it has seen (chained hashes, so a chunk matches only
  after the same prefix), bounded LRU;
- per instance, the image hashes it holds in its encoder cache.
Views may be stale (instances evict); a wrong guess costs a recompute or a `NeedEncode`, never an error.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from runtime.messages import GenerateRequest

MAX_CHUNKS_PER_INSTANCE = 1 << 16
MAX_HASHES_PER_INSTANCE = 1 << 14
BALANCE_ABS, BALANCE_REL = 8, 1.5  # pick_prefill: how far over the least loaded affinity may go
Sink = Callable[[Any], None]  # receives RequestOutput deltas, or one exception


@dataclass(eq=False)
class Flight:
    msg: GenerateRequest
    sink: Sink
    chain: list[int]
    p: str | None = None
    d: str | None = None
    handed_off: bool = False
    streamed: bool = False
    since: float = field(default_factory=time.monotonic)

    @property
    def holder(self) -> str | None:
        """The instance that has the request now (P until the handoff, then D)."""
        return self.d if self.handed_off else self.p


@dataclass
class EncodeTask:
    image: Any  # ImageInput with pixels
    e: str | None
    rids: set[str] = field(default_factory=set)


def chunk_chain(keys: Sequence, page_size: int) -> list[int]:
    """One hash per whole page of `keys`, each covering everything before it."""
    out, h = [], 0
    for i in range(page_size, len(keys) + 1, page_size):
        h = hash((h, tuple(keys[i - page_size:i])))
        out.append(h)
    return out


class LruSet:
    def __init__(self, capacity: int) -> None:
        self.capacity, self._items = capacity, OrderedDict()

    def add(self, key) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def discard(self, key) -> None:
        self._items.pop(key, None)

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


@dataclass
class InstanceView:
    """What the router knows about one live instance."""

    name: str
    roles: frozenset[str]
    inflight: int = 0  # requests routed here and not finished (P or D stage)
    encode_tokens: int = 0  # image tokens of encode jobs sent and not done
    free_pages: int = 0
    total_pages: int = 0
    waiting: int = 0
    running: int = 0
    draining_to: frozenset[str] | None = None  # role switching: takes no new work, then serves these roles
    chunks: LruSet = field(default_factory=lambda: LruSet(MAX_CHUNKS_PER_INSTANCE))
    images: LruSet = field(default_factory=lambda: LruSet(MAX_HASHES_PER_INSTANCE))

    def prefix_pages(self, chain: Sequence[int]) -> int:
        n = 0
        while n < len(chain) and chain[n] in self.chunks:
            n += 1
        return n

    def forget_caches(self) -> None:
        self.chunks.clear()
        self.images.clear()


def pick_prefill(views: Iterable[InstanceView], chain: Sequence[int]) -> InstanceView | None:
    """Longest cached prefix first, then the least loaded, among the instances whose load is near the least.

    Affinity alone would starve an instance that holds no prefix yet (a P just added by a role switch
    never gets chat traffic that shares a system prompt), so an instance more than `BALANCE_ABS` requests
    and `BALANCE_REL` times over the least loaded is passed over, as SGLang's cache-aware router does.
    """
    views = list(views)
    if not views:
        return None
    least = min(_load(v) for v in views)
    fair = [v for v in views if _load(v) <= max(least + BALANCE_ABS, least * BALANCE_REL)]
    return max(fair, key=lambda v: (v.prefix_pages(chain), -v.inflight, -v.waiting))


def _load(v: InstanceView) -> int:
    return v.inflight + v.waiting


def pick_decode(views: Iterable[InstanceView]) -> InstanceView | None:
    """Most free KV pages first (coarsely, so that small differences fall through to load), then load."""
    return max(views, key=lambda v: (v.free_pages // 64, -v.inflight, -v.running), default=None)


def plan_encodes(images: Sequence[tuple[str, int]], encoders: Sequence[InstanceView]) -> dict[str, InstanceView]:
    """Assign each distinct (content_hash, num_tokens) image to an E instance.

    An instance that already holds the image gets it (no second encode). Others go, one by one, to the
    instance with the least outstanding encode work, counting what this plan already gave it, so a
    request's images spread over all E instances and are encoded in parallel.
    """
    plan: dict[str, InstanceView] = {}
    extra = {v.name: 0 for v in encoders}
    for content_hash, tokens in images:
        if content_hash in plan or not encoders:
            continue
        holders = [v for v in encoders if content_hash in v.images]
        pool = holders or list(encoders)
        best = min(pool, key=lambda v: (v.encode_tokens + extra[v.name], v.inflight))
        plan[content_hash] = best
        if not holders:
            extra[best.name] += tokens
    return plan


def plan_encodes_for(images: Sequence, encoders: Sequence[InstanceView]) -> list[tuple[Any, InstanceView]]:
    """`plan_encodes` over image objects (with `content_hash`, `num_tokens`): (image, instance) pairs."""
    plan = plan_encodes([(im.content_hash, im.num_tokens) for im in images], encoders)
    return [(im, plan[im.content_hash]) for im in images if im.content_hash in plan]

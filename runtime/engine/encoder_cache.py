"""Encoder-output cache: image content hash -> vision-tower embeddings, LRU under a byte budget."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EncoderCache:
    """Thread-safe LRU of embeddings. Invariant: `num_bytes` (sum of stored tensors) <= `max_bytes`.

    Tensors are stored as given, not copied; callers must not modify them in place after `put`.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def get(self, content_hash: str) -> torch.Tensor | None:
        """The embeddings for `content_hash`, marking them most recently used; None (a miss) if absent."""
        with self._lock:
            t = self._items.get(content_hash)
            if t is None:
                self.misses += 1
                return None
            self._items.move_to_end(content_hash)
            self.hits += 1
            return t

    def put(self, content_hash: str, embeds: torch.Tensor) -> bool:
        """Store (or replace) an entry, evicting least recently used ones to fit.

        An entry larger than the whole budget is not stored (and any old entry for the hash is dropped).
        Returns whether it was stored.
        """
        size = tensor_bytes(embeds)
        with self._lock:
            self._remove(content_hash)
            if size > self.max_bytes:
                return False
            while self.num_bytes + size > self.max_bytes:
                self._remove(next(iter(self._items)))
            self._items[content_hash] = embeds
            self.num_bytes += size
            return True

    def _remove(self, content_hash: str) -> None:
        t = self._items.pop(content_hash, None)
        if t is not None:
            self.num_bytes -= tensor_bytes(t)

    def __contains__(self, content_hash: object) -> bool:
        """Presence check that neither counts as a hit/miss nor refreshes the LRU order."""
        with self._lock:
            return content_hash in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def hashes(self) -> list[str]:
        """Cached content hashes, least recently used first (for the router's cache view)."""
        with self._lock:
            return list(self._items)

    @property
    def hit_rate(self) -> float:
        with self._lock:
            total = self.hits + self.misses
            return self.hits / total if total else 0.0

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._items.clear()
            self.num_bytes = self.hits = self.misses = 0

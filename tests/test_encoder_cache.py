"""Encoder-output cache: byte budget, LRU order, counters, thread safety."""
from __future__ import annotations

import threading

import torch

from runtime.engine.encoder_cache import EncoderCache


def emb(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32)  # 4 * n bytes


def test_budget_respected_and_lru_evicted() -> None:
    cache = EncoderCache(max_bytes=40)
    for h in "abc":
        assert cache.put(h, emb(3))
    assert cache.num_bytes == 36
    assert cache.get("a") is not None  # "b" is now least recently used
    cache.put("d", emb(3))
    assert "b" not in cache and {"a", "c", "d"} <= set(cache.hashes())
    assert cache.num_bytes == 36 <= cache.max_bytes


def test_contains_does_not_refresh_or_count() -> None:
    cache = EncoderCache(max_bytes=24)
    cache.put("a", emb(3))
    cache.put("b", emb(3))
    assert "a" in cache
    cache.put("c", emb(3))
    assert "a" not in cache and cache.hits == cache.misses == 0


def test_oversize_item_not_stored() -> None:
    cache = EncoderCache(max_bytes=16)
    cache.put("a", emb(2))
    assert cache.put("big", emb(5)) is False
    assert "big" not in cache and "a" in cache and cache.num_bytes == 8


def test_replace_updates_bytes() -> None:
    cache = EncoderCache(max_bytes=100)
    cache.put("a", emb(2))
    cache.put("a", emb(5))
    assert len(cache) == 1 and cache.num_bytes == 20


def test_hit_rate() -> None:
    cache = EncoderCache(max_bytes=100)
    assert cache.hit_rate == 0.0
    cache.put("a", emb(1))
    cache.get("a"), cache.get("a"), cache.get("a"), cache.get("x")
    assert (cache.hits, cache.misses, cache.hit_rate) == (3, 1, 0.75)
    cache.clear()
    assert len(cache) == 0 and cache.num_bytes == 0 and cache.hit_rate == 0.0


def test_concurrent_puts_keep_the_budget() -> None:
    cache = EncoderCache(max_bytes=400)

    def work(tag: int) -> None:
        for i in range(200):
            cache.put(f"{tag}-{i % 30}", emb(1 + i % 7))
            cache.get(f"{1 - tag}-{i % 30}")

    threads = [threading.Thread(target=work, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.num_bytes == sum(t.numel() * 4 for t in map(cache.get, cache.hashes()) if t is not None)
    assert cache.num_bytes <= 400

"""Radix prefix cache: a stateful property test against a brute-force model of its contents."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from radix_helpers import contents
from runtime.engine.page_allocator import OutOfPages, PageAllocator
from runtime.engine.radix_cache import RadixCache, TreeNode


@dataclass
class Running:
    prefix: tuple  # chunks of the locked prefix
    node: TreeNode
    own: list[int]  # the partial last page, held outside the tree


class RadixMachine(RuleBasedStateMachine):
    """Reference: a dict of cached page-aligned prefixes -> page, with last-use times and lock counts."""

    @initialize(page_size=st.integers(1, 3), num_pages=st.integers(4, 14))
    def setup(self, page_size: int, num_pages: int) -> None:
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.cache = RadixCache(self.alloc, page_size)
        self.ref: dict[tuple, int] = {}
        self.used: dict[tuple, int] = {}
        self.clock = 0
        self.running: list[Running] = []
        self.hit = self.query = 0

    # -- reference model --

    def chunks(self, keys: list) -> tuple:
        return tuple(tuple(keys[i:i + self.ps]) for i in range(0, len(keys) - self.ps + 1, self.ps))

    def ref_match(self, chunks: tuple) -> tuple:
        n = 0
        while n < len(chunks) and chunks[:n + 1] in self.ref:
            n += 1
        return chunks[:n]

    def touch(self, chunks: tuple) -> None:
        self.clock += 1
        for i in range(1, len(chunks) + 1):
            self.used[chunks[:i]] = self.clock

    def locked(self, prefix: tuple) -> bool:
        return any(r.prefix[:len(prefix)] == prefix for r in self.running)

    def is_leaf(self, prefix: tuple) -> bool:
        return not any(len(p) == len(prefix) + 1 and p[:-1] == prefix for p in self.ref)

    def ref_evictable(self) -> int:
        return sum(not self.locked(p) for p in self.ref)

    def ref_evict(self, n: int) -> int:
        freed = 0
        while freed < n:
            cands = [p for p in self.ref if self.is_leaf(p) and not self.locked(p)]
            if not cands:
                break
            oldest = min(self.used[p] for p in cands)
            victims = [p for p in cands if self.used[p] == oldest]
            assert len(victims) == 1, "LRU order must be unambiguous among leaves"
            del self.ref[victims[0]], self.used[victims[0]]
            freed += 1
        return freed

    def ref_alloc_ok(self, n: int) -> bool:
        short = n - self.alloc.num_free
        if short > self.ref_evictable():
            return False
        self.ref_evict(max(short, 0))
        return True

    def ref_insert(self, chunks: tuple, pages: list[int]) -> list[int]:
        for i in range(1, len(chunks) + 1):
            self.ref.setdefault(chunks[:i], pages[i - 1])
        self.touch(chunks)
        return [self.ref[chunks[:i]] for i in range(1, len(chunks) + 1)]

    # -- rules --

    keys = st.lists(st.integers(0, 2), max_size=10)

    @rule(keys=keys, record=st.booleans())
    def match(self, keys: list, record: bool) -> None:
        m = self.cache.match_prefix(keys, record=record)
        want = self.ref_match(self.chunks(keys))
        assert m.pages == [self.ref[want[:i]] for i in range(1, len(want) + 1)]
        assert m.num_tokens == len(want) * self.ps
        if want:
            self.touch(want)
        if record:
            self.hit, self.query = self.hit + m.num_tokens, self.query + len(keys)

    @rule(keys=keys)
    def start_request(self, keys: list) -> None:
        """match, lock, alloc own suffix, insert, move the lock to the inserted node."""
        m = self.cache.match_prefix(keys, record=False)
        prefix = self.ref_match(self.chunks(keys))
        if prefix:
            self.touch(prefix)
        self.cache.lock(m.node)
        self.running.append(Running(prefix, m.node, []))
        need = -(-len(keys) // self.ps) - len(m.pages)
        if not self.ref_alloc_ok(need):
            with pytest.raises(OutOfPages):
                self.cache.alloc(need)
            return
        pages = m.pages + self.cache.alloc(need)
        r = self.cache.insert(keys, pages)
        full = self.chunks(keys)
        assert r.pages == self.ref_insert(full, pages) == pages[:len(full)]
        self.cache.lock(r.node)
        self.cache.unlock(m.node)
        self.running[-1] = Running(full, r.node, pages[len(full):])

    @rule(keys=keys)
    def insert_fresh(self, keys: list) -> None:
        """A request that computed everything itself: duplicates of cached pages go back to the allocator."""
        need = -(-len(keys) // self.ps)
        if not self.ref_alloc_ok(need):
            with pytest.raises(OutOfPages):
                self.cache.alloc(need)
            return
        pages = self.cache.alloc(need)
        full = self.chunks(keys)
        r = self.cache.insert(keys, pages)
        assert r.pages == self.ref_insert(full, pages)
        self.alloc.free(pages[len(full):])

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        req = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.cache.unlock(req.node)
        self.alloc.free(req.own)

    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        assert self.cache.evict(n) == self.ref_evict(n)

    @rule()
    def reset(self) -> None:
        flushed = self.cache.reset()
        assert flushed == (not any(r.prefix for r in self.running))
        if flushed:
            self.ref.clear()
            self.used.clear()
            self.hit = self.query = 0

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "cache"):
            return
        self.cache.check_integrity(in_use_pages=sum(len(r.own) for r in self.running))
        assert contents(self.cache) == self.ref
        assert self.cache.evictable_pages == self.ref_evictable()
        assert (self.cache.hit_tokens, self.cache.query_tokens) == (self.hit, self.query)


RadixMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestRadixMachine = RadixMachine.TestCase

"""Radix prefix cache: a stateful property test against a brute-force model, plus unit tests."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime.page_allocator import OutOfPages, PageAllocator
from runtime.radix_cache import RadixCache, TreeNode, prefix_keys

IMG = 99


@dataclass(frozen=True)
class Img:
    content_hash: str
    num_tokens: int


def make(num_pages: int = 16, page_size: int = 2) -> tuple[RadixCache, PageAllocator]:
    alloc = PageAllocator(num_pages)
    return RadixCache(alloc, page_size), alloc


def fill(cache: RadixCache, keys: list) -> list[int]:
    """Cache `keys` as a fresh request would (alloc, insert, release), returning the cached pages."""
    n = -(-len(keys) // cache.page_size)
    r = cache.insert(keys, cache.alloc(n))
    return r.pages


def contents(cache: RadixCache) -> dict[tuple, int]:
    """Every cached whole-page prefix (a tuple of chunks) -> the page holding its last chunk."""
    out: dict[tuple, int] = {}

    def visit(node: TreeNode, prefix: tuple) -> None:
        for chunk, page in zip(node.chunks, node.pages):
            prefix += (chunk,)
            out[prefix] = page
        for child in node.children.values():
            visit(child, prefix)

    for child in cache.root.children.values():
        visit(child, ())
    return out


# ---------------------------------------------------------------- property test


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


# ---------------------------------------------------------------- image keys


def test_prefix_keys_maps_placeholders_to_hash_and_index() -> None:
    keys = prefix_keys([1, IMG, IMG, 2, IMG], [Img("a", 2), Img("b", 1)], IMG)
    assert keys == [1, ("a", 0), ("a", 1), 2, ("b", 0)]


@pytest.mark.parametrize("ids", [[IMG, IMG], [IMG, IMG, IMG, IMG]])
def test_prefix_keys_rejects_placeholder_count_mismatch(ids: list[int]) -> None:
    with pytest.raises(ValueError):
        prefix_keys(ids, [Img("a", 3)], IMG)


def prompt(img: str) -> list:
    return prefix_keys([1, 2, 3, 4, IMG, IMG, IMG, IMG, 5, 6], [Img(img, 4)], IMG)


def test_same_image_same_place_hits() -> None:
    cache, _ = make()
    pages = fill(cache, prompt("a"))
    m = cache.match_prefix(prompt("a"))
    assert m.pages == pages and m.num_tokens == 10


def test_different_image_same_place_diverges_at_the_image() -> None:
    cache, _ = make()
    fill(cache, prompt("a"))
    m = cache.match_prefix(prompt("b"))
    assert m.num_tokens == 4  # the text before the image, which ends on a page boundary


def test_same_image_elsewhere_misses() -> None:
    cache, _ = make()
    fill(cache, prompt("a"))
    assert cache.match_prefix([7, 7] + prompt("a")).num_tokens == 0


# ---------------------------------------------------------------- structure and ownership


def test_partial_last_page_is_not_cached() -> None:
    cache, alloc = make(page_size=2)
    pages = cache.alloc(3)
    r = cache.insert([1, 2, 3, 4, 5], pages)
    assert r.pages == pages[:2] and r.num_tokens == 4 and cache.cached_pages == 2
    cache.check_integrity(in_use_pages=1)
    alloc.free(pages[2:])
    assert cache.match_prefix([1, 2, 3, 4, 5]).num_tokens == 4


def test_split_at_page_boundary() -> None:
    cache, _ = make(page_size=2)
    a = fill(cache, [1, 2, 3, 4, 5, 6, 7, 8])
    b = fill(cache, [1, 2, 3, 4, 9, 9])
    (head,) = cache.root.children.values()
    assert head.pages == a[:2] and len(head.children) == 2
    assert b[:2] == a[:2] and cache.cached_pages == 5
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).pages == a
    cache.check_integrity(in_use_pages=0)


def test_match_ending_inside_a_node_splits_it() -> None:
    cache, _ = make(page_size=2)
    a = fill(cache, [1, 2, 3, 4, 5, 6])
    m = cache.match_prefix([1, 2, 3, 4, 0, 0])
    assert m.pages == a[:2] and m.node.pages == a[:2]
    cache.lock(m.node)
    assert cache.evict(10) == 1  # only the unlocked tail page
    cache.check_integrity(in_use_pages=0)


def test_duplicate_insert_frees_duplicate_pages() -> None:
    cache, alloc = make(num_pages=8, page_size=2)
    first = fill(cache, [1, 2, 3, 4])
    dup = alloc.alloc(3)
    r = cache.insert([1, 2, 3, 4, 5, 6], dup)
    assert r.pages == first + [dup[2]]
    assert alloc.num_free == 8 - 3 and cache.cached_pages == 3
    cache.check_integrity(in_use_pages=0)


def test_insert_rejects_pages_the_cache_already_owns_elsewhere() -> None:
    cache, _ = make(page_size=1)
    a = fill(cache, [1, 2])
    with pytest.raises(ValueError):
        cache.insert([3], [a[0]])


def test_two_requests_share_a_prefix() -> None:
    cache, alloc = make(num_pages=10, page_size=2)
    prompt_a, prompt_b = [1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7]
    m = cache.match_prefix(prompt_a)
    cache.lock(m.node)
    a_pages = m.pages + cache.alloc(3)
    r = cache.insert(prompt_a, a_pages)
    cache.lock(r.node)
    cache.unlock(m.node)
    # a fork arrives while the first request runs: it reuses the prefix and allocates only its own page
    m2 = cache.match_prefix(prompt_b)
    cache.lock(m2.node)
    assert m2.pages == a_pages[:2]
    b_own = cache.alloc(1)
    assert cache.evict(10) == 0  # everything cached is locked by one of the two
    cache.check_integrity(in_use_pages=2)  # a's partial page and b's page
    cache.unlock(r.node)
    cache.unlock(m2.node)
    alloc.free(a_pages[2:] + b_own)
    cache.check_integrity(in_use_pages=0)
    assert alloc.num_free == 10 - 2


# ---------------------------------------------------------------- eviction


def test_lru_eviction_order() -> None:
    cache, _ = make(page_size=1)
    a, _, c = fill(cache, [1]), fill(cache, [2]), fill(cache, [3])
    cache.match_prefix([1])  # a is now the most recent
    assert cache.evict(1) == 1
    assert contents(cache) == {((1,),): a[0], ((3,),): c[0]}
    cache.evict(1)
    assert contents(cache) == {((1,),): a[0]}


def test_eviction_trims_leaf_tail_and_parent_follows_children() -> None:
    cache, _ = make(page_size=1)
    fill(cache, [1, 2])
    fill(cache, [1, 3, 4])
    cache.match_prefix([1, 2])  # [1, 3, 4] branch is older
    assert cache.evict(1) == 1
    assert cache.match_prefix([1, 3, 4]).num_tokens == 2
    assert cache.evict(2) == 2
    assert set(contents(cache)) == {((1,),)}  # the parent went only once both children had
    cache.check_integrity(in_use_pages=0)


def test_locked_nodes_survive_eviction() -> None:
    cache, alloc = make(num_pages=6, page_size=1)
    fill(cache, [1, 2, 3])
    fill(cache, [4, 5])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.node)
    assert cache.evictable_pages == 2
    assert cache.evict(10) == 2
    assert cache.match_prefix([1, 2, 3]).pages == m.pages
    with pytest.raises(OutOfPages):
        cache.alloc(4)
    assert cache.cached_pages == 3  # a failed alloc evicts nothing
    cache.unlock(m.node)
    assert len(cache.alloc(6)) == 6 and cache.cached_pages == 0
    assert alloc.num_free == 0


def test_alloc_evicts_only_what_it_needs() -> None:
    cache, alloc = make(num_pages=4, page_size=1)
    fill(cache, [1, 2, 3])
    cache.alloc(2)
    assert cache.cached_pages == 2 and cache.match_prefix([1, 2, 3]).num_tokens == 2
    cache.check_integrity(in_use_pages=2)


def test_reset_refuses_while_locked() -> None:
    cache, alloc = make(num_pages=4, page_size=1)
    fill(cache, [1, 2])
    m = cache.match_prefix([1])
    cache.lock(m.node)
    assert cache.reset() is False and cache.cached_pages == 2
    cache.unlock(m.node)
    assert cache.reset() is True and cache.cached_pages == 0 and alloc.num_free == 4
    assert cache.hit_rate == 0.0


def test_hit_rate_counts_tokens() -> None:
    cache, _ = make(page_size=2)
    fill(cache, [1, 2, 3, 4])
    cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.match_prefix([9, 9], record=False)
    assert (cache.hit_tokens, cache.query_tokens) == (4, 6)


# ---------------------------------------------------------------- misuse is caught


def test_unlock_without_lock_raises() -> None:
    cache, _ = make(page_size=1)
    r = cache.insert([1], cache.alloc(1))
    with pytest.raises(RuntimeError):
        cache.unlock(r.node)


def test_lock_of_evicted_node_raises() -> None:
    cache, _ = make(page_size=1)
    r = cache.insert([1], cache.alloc(1))
    cache.evict(1)
    with pytest.raises(ValueError):
        cache.lock(r.node)


def test_integrity_catches_a_leak() -> None:
    cache, alloc = make(page_size=1)
    fill(cache, [1, 2])
    alloc.alloc(1)  # held by nobody we report
    with pytest.raises(AssertionError, match="in use"):
        cache.check_integrity(in_use_pages=0)

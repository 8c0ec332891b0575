"""Radix prefix cache: unit tests of image keys, splits, sharing, eviction, locks and integrity."""
from __future__ import annotations

import pytest

from radix_helpers import IMG, Img, contents, fill, make
from runtime.engine.page_allocator import OutOfPages
from runtime.engine.radix_cache import prefix_keys


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

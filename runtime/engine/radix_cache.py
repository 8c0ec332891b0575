"""KV prefix cache: a radix tree over page-sized chunks of keys, with reference counts and LRU eviction.

Keys are token ids, except that image placeholder tokens carry keys derived from the image's content
hash (see `prefix_keys`), so the same image at the same place hits and different images never collide.
Only whole pages are cached or matched; a sequence's partial last page always stays with its request.

Page ownership. Every page id is in exactly one of three places:
  * free in the `PageAllocator`;
  * cached: owned by the tree (a node's `pages`), freed only by eviction;
  * in use: owned by a request (allocated by it and not yet inserted, e.g. its partial last page).
`check_integrity(in_use)` asserts free + cached + in use == total.

How requests share a prefix (forks, n > 1, multi-turn):
  1. `m = cache.match_prefix(keys)`; `cache.lock(m.node)`. The request's block table starts with
     `m.pages`; it does not own them, the lock only keeps them from being evicted.
  2. It allocates its own pages for the rest (`cache.alloc(n)`) and prefills only those tokens.
  3. After prefill (and again at finish) it calls `r = cache.insert(keys, block_table)`, then
     `cache.lock(r.node)`; `cache.unlock(m.node)`, and replaces the first `len(r.pages)` entries of its
     block table with `r.pages`. Its pages past that (the partial last page) remain its own.
  A second request with the same prefix that arrives after step 3 matches the first one's pages and
  allocates only its own suffix. If both computed the prefix concurrently, the later `insert` frees
  its duplicate pages and hands back the cached ones, so from then on they share.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from runtime.engine.page_allocator import OutOfPages, PageAllocator

if TYPE_CHECKING:
    from runtime.messages import ImageInput

Key = Hashable
Chunk = tuple  # the keys of one page, length page_size

_node_ids = itertools.count()


def prefix_keys(input_ids: Sequence[int], images: Sequence["ImageInput"], image_token_id: int) -> list[Key]:
    """Cache keys for a prompt: the k-th placeholder token of an image maps to (content_hash, k).

    Images are consumed in order, each taking its `num_tokens` placeholders. Other tokens keep their id.
    """
    keys: list[Key] = []
    slots = ((img.content_hash, k) for img in images for k in range(img.num_tokens))
    for tok in input_ids:
        if tok == image_token_id:
            slot = next(slots, None)
            if slot is None:
                raise ValueError("more image placeholder tokens than the images account for")
            keys.append(slot)
        else:
            keys.append(tok)
    if next(slots, None) is not None:
        raise ValueError("fewer image placeholder tokens than the images account for")
    return keys


@dataclass(eq=False)
class TreeNode:
    """An edge of one or more pages. `chunks[i]` are the keys of `pages[i]`.

    `lock_ref` = `holders` (locks taken on this node) + the children's `lock_ref`s: a lock covers the
    whole path root -> node. `last_access` of a parent is >= that of any child.
    """

    chunks: list[Chunk]
    pages: list[int]
    parent: "TreeNode | None"
    children: dict[Chunk, "TreeNode"] = field(default_factory=dict)
    lock_ref: int = 0
    holders: int = 0
    last_access: int = 0
    id: int = field(default_factory=lambda: next(_node_ids))


@dataclass
class Match:
    """A cached prefix: `pages` hold its first `num_tokens` positions; lock `node` to keep them."""

    pages: list[int]
    num_tokens: int
    node: TreeNode


class RadixCache:
    """The prefix tree of one instance's KV pool. Not thread-safe: the scheduler loop owns it."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.allocator, self.page_size = allocator, page_size
        self.root = TreeNode(chunks=[], pages=[], parent=None)
        self._owned: set[int] = set()  # pages owned by the tree
        self.evictable_pages = 0  # of those, pages in nodes with lock_ref == 0
        self.hit_tokens = 0
        self.query_tokens = 0
        self._clock = 0

    @property
    def cached_pages(self) -> int:
        return len(self._owned)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # ---- lookup and insert ----

    def match_prefix(self, keys: Sequence[Key], record: bool = True) -> Match:
        """The longest cached whole-page prefix of `keys`; refreshes its LRU time.

        Splits a node where the match ends inside it, so `node` covers exactly the matched pages.
        `record=False` leaves the hit-rate counters alone (for re-checks of a waiting request).
        """
        node, pages = self._walk(self._chunks(keys))
        if record:
            self.query_tokens += len(keys)
            self.hit_tokens += len(pages) * self.page_size
        return Match(pages, len(pages) * self.page_size, node)

    def insert(self, keys: Sequence[Key], pages: Sequence[int]) -> Match:
        """Cache the first `len(keys) // page_size` pages of a sequence; `pages` is its block table.

        Ownership: of `pages[:n]`, those not already in the tree pass to the tree. Where that part of
        the prefix was already cached under a different page, the caller's duplicate page is freed to
        the allocator; pages equal to the cached ones (from a match) are left as they are. The returned
        `pages` are the tree's pages for the whole prefix: the caller must use them in place of its own.
        `pages[n:]` stay the caller's. The result is not locked.
        """
        chunks = self._chunks(keys)
        n = len(chunks)
        if len(pages) < n:
            raise ValueError(f"{n} whole pages of keys but only {len(pages)} pages")
        node, cached = self._walk(chunks)
        dup = [p for p, c in zip(pages, cached) if p != c]
        new = list(pages[len(cached):n])
        self._check_not_cached(dup + new)
        self.allocator.free(dup)
        if new:
            node = self._add_child(node, chunks[len(cached):], new)
        return Match(cached + new, n * self.page_size, node)

    def _chunks(self, keys: Sequence[Key]) -> list[Chunk]:
        ps = self.page_size
        return [tuple(keys[i:i + ps]) for i in range(0, len(keys) - ps + 1, ps)]

    def _walk(self, chunks: list[Chunk]) -> tuple[TreeNode, list[int]]:
        """Follow `chunks` down from the root, splitting where the match ends mid-edge; touch the path."""
        self._clock += 1
        node, pages, i = self.root, [], 0
        while i < len(chunks) and (child := node.children.get(chunks[i])) is not None:
            n = _common_len(child.chunks, chunks, i)
            if n < len(child.chunks):
                child = self._split(child, n)
            child.last_access = self._clock
            pages += child.pages
            node, i = child, i + n
        return node, pages

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut `child` after its first n pages. `child` keeps the tail, so locks held on it stay valid."""
        parent = child.parent
        assert parent is not None
        head = TreeNode(chunks=child.chunks[:n], pages=child.pages[:n], parent=parent,
                        lock_ref=child.lock_ref, last_access=child.last_access)
        child.chunks, child.pages, child.parent = child.chunks[n:], child.pages[n:], head
        head.children[child.chunks[0]] = child
        parent.children[head.chunks[0]] = head
        return head

    def _add_child(self, parent: TreeNode, chunks: list[Chunk], pages: list[int]) -> TreeNode:
        node = TreeNode(chunks=chunks, pages=pages, parent=parent, last_access=self._clock)
        parent.children[chunks[0]] = node
        self._owned.update(pages)
        self.evictable_pages += len(pages)
        return node

    def _check_not_cached(self, pages: list[int]) -> None:
        if clash := [p for p in pages if p in self._owned]:
            raise ValueError(f"pages {clash} are already owned by the cache at another position")

    # ---- locking ----

    def lock(self, node: TreeNode) -> None:
        """Pin the path root -> node against eviction. Locking the root is a no-op."""
        if node is self.root:
            return
        if node.parent is None:
            raise ValueError("node was evicted; lock it right after match_prefix/insert")
        node.holders += 1
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_pages -= len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        """Release one `lock(node)`."""
        if node is self.root:
            return
        if node.holders == 0:
            raise RuntimeError("unlock of a node that is not locked")
        node.holders -= 1
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_pages += len(node.pages)
            node = node.parent

    # ---- eviction and allocation ----

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages from unlocked leaves, least recently used first.

        A leaf loses pages from its tail, so exactly min(num_pages, evictable_pages) are freed; a parent
        becomes a candidate once its last child is gone. Returns the number freed.
        """
        heap = [(n.last_access, n.id, n) for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, leaf = heapq.heappop(heap)
            take = min(len(leaf.pages), num_pages - freed)
            self._drop_tail(leaf, take)
            freed += take
            parent = leaf.parent
            if not leaf.pages and parent is not None:
                del parent.children[leaf.chunks[0]]
                leaf.parent = None
                if parent is not self.root and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def _drop_tail(self, leaf: TreeNode, k: int) -> None:
        keep = len(leaf.pages) - k
        self.allocator.free(leaf.pages[keep:])
        self._owned.difference_update(leaf.pages[keep:])
        self.evictable_pages -= k
        leaf.pages = leaf.pages[:keep]
        if keep:  # chunks[0] keys the node in its parent; keep it when the node is removed
            leaf.chunks = leaf.chunks[:keep]

    def alloc(self, n: int) -> list[int]:
        """Allocate n pages, evicting LRU cache pages if needed.

        Raises `OutOfPages` (evicting nothing) when free + evictable pages cannot cover n.
        """
        short = n - self.allocator.num_free
        if short > 0:
            if short > self.evictable_pages:
                raise OutOfPages(f"asked for {n} pages: {self.allocator.num_free} free, "
                                 f"{self.evictable_pages} evictable, "
                                 f"{self.cached_pages - self.evictable_pages} locked in the cache")
            self.evict(short)
        return self.allocator.alloc(n)

    def reset(self) -> bool:
        """Flush the whole cache (SGLang's /flush_cache). Refuses, changing nothing, while any node is
        locked, i.e. while a request is using cached pages. Returns whether it flushed."""
        if self.cached_pages != self.evictable_pages:
            return False
        self.evict(self.cached_pages)
        self.hit_tokens = self.query_tokens = 0
        return True

    # ---- inspection ----

    def _nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_integrity(self, in_use_pages: int) -> None:
        """Assert the cache invariants; `in_use_pages` is what requests hold outside the tree."""
        seen: set[int] = set()
        evictable = 0
        for node in self._nodes():
            self._check_node(node)
            dup = seen.intersection(node.pages)
            assert not dup, f"pages {sorted(dup)} appear twice in the tree"
            seen.update(node.pages)
            evictable += len(node.pages) if node.lock_ref == 0 else 0
        free = [p for p in seen if self.allocator._is_free[p]]  # reads the allocator's own record
        assert not free, f"cached pages {free} are also on the free list"
        assert seen == self._owned, f"owned set {sorted(self._owned)} != tree pages {sorted(seen)}"
        assert evictable == self.evictable_pages, \
            f"evictable_pages={self.evictable_pages}, unlocked nodes hold {evictable}"
        total = self.allocator.num_free + self.cached_pages + in_use_pages
        assert total == self.allocator.num_pages, (
            f"free {self.allocator.num_free} + cached {self.cached_pages} + in use {in_use_pages} "
            f"= {total} != total {self.allocator.num_pages}")

    def _check_node(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and node.pages, "detached or empty node in the tree"
        assert parent.children.get(node.chunks[0]) is node, "node is not keyed by its first chunk"
        assert len(node.chunks) == len(node.pages), "chunks and pages differ in length"
        assert all(len(c) == self.page_size for c in node.chunks), "chunk is not one page of keys"
        assert node.holders >= 0, f"negative holders on node {node.id}"
        child_refs = sum(c.lock_ref for c in node.children.values())
        assert node.lock_ref == node.holders + child_refs, \
            f"node {node.id}: lock_ref {node.lock_ref} != holders {node.holders} + children {child_refs}"
        assert parent is self.root or parent.last_access >= node.last_access, "LRU order broken"


def _common_len(edge: list[Chunk], chunks: list[Chunk], start: int) -> int:
    n = 0
    while n < len(edge) and start + n < len(chunks) and edge[n] == chunks[start + n]:
        n += 1
    return n

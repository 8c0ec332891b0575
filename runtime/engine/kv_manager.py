"""Page ownership for requests: allocation, prefix-cache reuse, release."""
from __future__ import annotations

from runtime.engine.page_allocator import OutOfPages, PageAllocator
from runtime.engine.radix_cache import RadixCache, prefix_keys
from runtime.engine.request import Req


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class KVManager:
    """Gives each request a block table. Without a prefix cache, every page a request holds is its own."""

    def __init__(self, allocator: PageAllocator, page_size: int) -> None:
        self.allocator, self.page_size = allocator, page_size

    @property
    def total_pages(self) -> int:
        return self.allocator.num_pages

    def available_pages(self) -> int:
        return self.allocator.num_free

    def used_pages(self) -> int:
        return self.total_pages - self.allocator.num_free

    def match_prefix(self, req: Req, limit: int) -> None:
        """Reuse cached KV for at most `limit` leading tokens (no-op without a prefix cache)."""

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Make `req.pages` cover `num_tokens` positions. False (and nothing changed) if pages ran out."""
        need = pages_for(num_tokens, self.page_size) - len(req.pages)
        if need <= 0:
            return True
        try:
            req.pages.extend(self._alloc(need))
        except OutOfPages:
            return False
        return True

    def release(self, req: Req, cache: bool) -> None:
        """Give back every page of `req`; `cache` asks to keep its KV for reuse where supported."""
        self.allocator.free(req.pages[req.num_shared_pages:])
        req.pages, req.num_shared_pages, req.num_computed = [], 0, 0

    def _alloc(self, n: int) -> list[int]:
        return self.allocator.alloc(n)

    def cache_computed(self, req: Req) -> None:
        """Offer the request's computed prefix for sharing (no-op without a prefix cache)."""

    def flush(self) -> bool:
        return True

    def check_integrity(self, reqs: list[Req]) -> None:
        held = sum(len(r.pages) - r.num_shared_pages for r in reqs)
        assert self.allocator.num_free + held == self.total_pages, "pages leaked or double-counted"


class RadixKVManager(KVManager):
    """Shares whole KV pages between requests through the radix prefix cache.

    A request's block table starts with `num_shared_pages` pages owned by the tree (kept alive by a lock
    on `prefix_node`); the rest are its own until it inserts them into the tree.
    """

    def __init__(self, allocator: PageAllocator, page_size: int, image_token_id: int) -> None:
        super().__init__(allocator, page_size)
        self.cache = RadixCache(allocator, page_size)
        self.image_token_id = image_token_id

    def available_pages(self) -> int:
        return self.allocator.num_free + self.cache.evictable_pages

    def match_prefix(self, req: Req, limit: int) -> None:
        m = self.cache.match_prefix(self._keys(req)[:limit])
        self._relock(req, m.node)
        req.pages, req.num_shared_pages = list(m.pages), len(m.pages)
        req.num_computed = req.cached_tokens = m.num_tokens

    def cache_computed(self, req: Req) -> None:
        """Hand the request's whole computed pages to the tree so others can share them now."""
        keys = self._keys(req)[:req.num_computed]
        m = self.cache.insert(keys, req.pages[:len(keys) // self.page_size])
        self._relock(req, m.node)
        req.pages[:len(m.pages)] = m.pages
        req.num_shared_pages = len(m.pages)

    def release(self, req: Req, cache: bool) -> None:
        if cache and req.num_computed:
            self.cache_computed(req)
        self.allocator.free(req.pages[req.num_shared_pages:])
        self._relock(req, None)
        req.pages, req.num_shared_pages, req.num_computed = [], 0, 0

    def _alloc(self, n: int) -> list[int]:
        return self.cache.alloc(n)

    def flush(self) -> bool:
        return self.cache.reset()

    def check_integrity(self, reqs: list[Req]) -> None:
        self.cache.check_integrity(sum(len(r.pages) - r.num_shared_pages for r in reqs))

    def _relock(self, req: Req, node) -> None:
        if node is not None:
            self.cache.lock(node)
        if req.prefix_node is not None:
            self.cache.unlock(req.prefix_node)
        req.prefix_node = node

    def _keys(self, req: Req) -> list:
        if req.prompt_keys is None:
            req.prompt_keys = prefix_keys(req.msg.input_ids, req.msg.images, self.image_token_id)
        return req.prompt_keys + req.output_ids

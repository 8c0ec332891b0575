"""Page ownership for requests: allocation, prefix-cache reuse, release."""
from __future__ import annotations

from runtime.page_allocator import OutOfPages, PageAllocator
from runtime.request import Req


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

    def flush(self) -> bool:
        return True

    def check_integrity(self, reqs: list[Req]) -> None:
        held = sum(len(r.pages) - r.num_shared_pages for r in reqs)
        assert self.allocator.num_free + held == self.total_pages, "pages leaked or double-counted"

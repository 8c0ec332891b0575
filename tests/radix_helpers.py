"""Shared helpers of the radix-cache tests: tiny caches, filling them, reading their contents."""
from __future__ import annotations

from dataclasses import dataclass

from runtime.engine.page_allocator import PageAllocator
from runtime.engine.radix_cache import RadixCache, TreeNode

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

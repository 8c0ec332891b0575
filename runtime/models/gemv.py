"""One-row matmuls on CPU, split by output rows over the calling thread and helper threads.

A one-row decode step reads every weight once; its speed is the memory bandwidth one GEMV reaches. On a 2-core
AMD EPYC (AVX2), the small model's 48 LM projections (541 MB of fp32, far beyond the cache) streamed at
12.5-13.5 GB/s as one OpenMP GEMV at 2 threads (MKL `mv` or oneDNN alike) and at 14.9 GB/s as MKL `mv` at
1 thread, while a plain `sum` reads 23.6 GB/s on two threads. Split by rows over two Python threads, each
one MKL `mv` at 1 torch thread, they streamed at 18.5 GB/s (29 against 40 ms a step). In the model the
rest of the step must then run at 1 thread too (`split_over`), or the caller's OpenMP team spins on the
helpers' core.

Bits: every part is MKL's one-thread GEMV over whole rows, so each output is the same dot product whichever
way the rows are cut, and however many threads the caller has (checked in tests/test_gemv.py).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

# Cuts fall on multiples of this many rows: MKL's GEMV handles rows in blocks, and a row's dot product came out
# with other roundings when a cut moved it to another place in a block or to another alignment.
ALIGN_ROWS = 16
# Weights from this many values up: smaller ones sit in the cache, where a split gains nothing.
MIN_VALUES = 1 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_local = threading.local()  # `parts`: this thread's split, set by `split_over`


def _helpers(n: int) -> ThreadPoolExecutor:
    """A pool of `n` threads, each at one torch thread (kept for the process, grown when asked for more)."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="gemv", initializer=torch.set_num_threads,
                                       initargs=(1,))
            _pool_size = n
        return _pool


def _part(weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor, a: int, b: int) -> torch.Tensor:
    if bias is None:
        return torch.mv(weight[a:b], v)
    return torch.addmv(bias[a:b], weight[a:b], v)


def split_parts() -> int:
    """Into how many pieces this thread's one-row matmuls are cut now (1: not split)."""
    return getattr(_local, "parts", 1)


def split_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a one-row `x`: in `split_over(n)`, over n threads; else on one."""
    parts, rows, v = split_parts(), weight.shape[0], x[0]
    size = -(-rows // (parts * ALIGN_ROWS)) * ALIGN_ROWS  # rows a piece: rows / parts, up to ALIGN_ROWS
    cuts = [min(rows, i * size) for i in range(parts)] + [rows]
    futures = []
    if parts > 1:
        pool = _helpers(parts - 1)
        futures = [pool.submit(_part, weight, bias, v, a, b) for a, b in zip(cuts[1:-1], cuts[2:])]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same one-thread GEMV, whatever the caller's count
    try:
        head = _part(weight, bias, v, cuts[0], cuts[1])
    finally:
        torch.set_num_threads(threads)
    return torch.cat([head, *(f.result() for f in futures)]).unsqueeze(0)


@contextlib.contextmanager
def split_over(parts: int) -> Iterator[None]:
    """One-row matmuls on this thread are cut into `parts` pieces, this thread running one and helper threads
    the rest. The caller runs at one torch thread meanwhile: an OpenMP team of its own would spin on the
    cores the helpers need (a whole one-row decode step at 1 thread with split GEMVs ran 10% faster than at
    2 threads with oneDNN's: docs/performance.md)."""
    threads = torch.get_num_threads()
    _local.parts = parts
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _local.parts = 1
        torch.set_num_threads(threads)

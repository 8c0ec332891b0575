"""Start-up calibration: pick batch budgets that keep a scheduler step under the TPOT target."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from runtime.engine.model_runner import block_tables, page_slots
from runtime.engine.page_allocator import PageAllocator
from runtime.models.forward_batch import ForwardBatch, KVPool

log = logging.getLogger(__name__)

DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
PREFILL_TOKENS = (128, 256, 512, 1024, 2048, 4096)
ENCODE_TOKENS = (64, 256, 1024)
CONTEXT = 256  # typical KV length of a running request while measuring decode


@dataclass(frozen=True)
class Budgets:
    max_running: int
    prefill_token_budget: int
    encode_token_budget: int


def _batch(lengths: list[int], extend: list[int], pages: list[list[int]], page_size: int) -> ForwardBatch:
    slots = [page_slots(table, n - e, n, page_size) for n, e, table in zip(lengths, extend, pages)]
    positions = torch.cat([torch.arange(n - e, n) for n, e in zip(lengths, extend)]).expand(3, -1)
    return ForwardBatch(is_decode=all(e == 1 for e in extend), input_ids=torch.zeros(sum(extend), dtype=torch.long),
                        positions=positions.contiguous(), extend_lens=extend, seq_lens=lengths,
                        block_tables=block_tables(pages), out_slots=torch.cat(slots),
                        logits_indices=torch.cumsum(torch.tensor(extend), 0) - 1)


def best_ms(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Best of `repeats` after a warm-up, in ms: the least disturbed by other load on the machine."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def _lm_ms(model, kv: KVPool, allocator: PageAllocator, lengths: list[int], extend: list[int]) -> float | None:
    ps = kv.page_size
    need = [-(-n // ps) for n in lengths]
    if sum(need) > allocator.num_free:
        return None
    pages = [allocator.alloc(n) for n in need]
    try:
        batch = _batch(lengths, extend, pages, ps)
        fn = model.decode if batch.is_decode else model.prefill
        with torch.inference_mode():
            return best_ms(lambda: fn(batch, kv))
    finally:
        for p in pages:
            allocator.free(p)


def _encode_ms(model, tokens: int) -> float:
    pixels, grid = model.dummy_image(tokens)  # the model knows its pixel layout (patches, or a fixed size)
    with torch.inference_mode():
        return best_ms(lambda: model.encode(pixels, grid), repeats=2)


def calibrate(model, kv: KVPool, allocator: PageAllocator, target_ms: float, defaults: Budgets) -> Budgets:
    """Largest decode batch under the target, then the prefill chunk that still fits beside half of it."""
    decode = {b: _lm_ms(model, kv, allocator, [CONTEXT] * b, [1] * b) for b in DECODE_BATCHES}
    fitting = [b for b, ms in decode.items() if ms is not None and ms <= target_ms]
    max_running = max(fitting, default=1)
    beside = decode.get(max(1, max_running // 2)) or decode[1] or 0.0
    prefill = {t: _lm_ms(model, kv, allocator, [t], [t]) for t in PREFILL_TOKENS}
    chunk = max((t for t, ms in prefill.items() if ms is not None and ms + beside <= target_ms),
                default=PREFILL_TOKENS[0])
    budgets = Budgets(max_running, chunk, defaults.encode_token_budget)
    if model.visual is not None:
        enc = {t: _encode_ms(model, t) for t in ENCODE_TOKENS}
        fitting = max((t for t, ms in enc.items() if ms <= target_ms), default=ENCODE_TOKENS[0])
        budgets = Budgets(max_running, chunk, fitting)
        log.info("encode ms by image tokens: %s", _fmt(enc))
    log.info("decode ms by batch (context %d): %s", CONTEXT, _fmt(decode))
    log.info("prefill ms by tokens: %s", _fmt(prefill))
    log.info("TPOT target %.0f ms -> %s", target_ms, budgets)
    return budgets


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}:{'-' if v is None else f'{v:.1f}'}" for k, v in d.items())

"""One instance's engine: everything a single process needs to run encode, prefill and decode.

- `Engine` (core): admission, the step loop, outputs as deltas; also the offline `runtime.Engine`.
- `Scheduler` (scheduler): stage-level batches (encode, prefill, decode) under token budgets.
- `Req` (request): per-request state inside one engine.
- KV: `PageAllocator` (page_allocator), `RadixCache` (radix_cache), `KVManager`/`RadixKVManager`
  (kv_manager), sized by kv_setup.
- `EncoderCache` (encoder_cache), `ModelRunner` (model_runner), `sample` (sampler), `GrammarCompiler`
  (grammar), `IncrementalDetokenizer` (detokenizer), `calibrate` (calibrate).

It imports `runtime.models` and the shared leaf modules (`runtime.config`, `runtime.messages`,
`runtime.preprocess`), never `runtime.cluster` or `runtime.server`. Names load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_OFFERS = {"Engine": "core", "Completion": "completion", "Scheduler": "scheduler", "Req": "request",
           "PageAllocator": "page_allocator", "RadixCache": "radix_cache", "KVManager": "kv_manager",
           "RadixKVManager": "kv_manager", "EncoderCache": "encoder_cache", "ModelRunner": "model_runner",
           "GrammarCompiler": "grammar", "IncrementalDetokenizer": "detokenizer"}
__all__ = sorted(_OFFERS)


def __getattr__(name: str) -> Any:
    if name in _OFFERS:
        return getattr(importlib.import_module(f"{__name__}.{_OFFERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

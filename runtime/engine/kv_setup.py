"""Sizing and wiring of an instance's KV pool and page managers."""
from __future__ import annotations

import logging

import torch

from runtime.config import EngineConfig
from runtime.engine.kv_manager import KVManager, RadixKVManager
from runtime.engine.page_allocator import PageAllocator
from runtime.models.forward_batch import KVPool

log = logging.getLogger(__name__)


def build_kv(model_config, config: EngineConfig) -> KVPool:
    dtype = getattr(torch, config.dtype)
    page_bytes = (2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim
                  * config.page_size * torch.tensor([], dtype=dtype).element_size())
    num_pages = config.num_pages or max(1, config.kv_cache_bytes // page_bytes)
    log.info("KV pool: %d pages of %d tokens (%.1f MiB)", num_pages, config.page_size,
             num_pages * page_bytes / 2**20)
    return KVPool(model_config.num_layers, num_pages, config.page_size, model_config.num_kv_heads,
                  model_config.head_dim, dtype, config.device)


def build_kv_manager(pool: KVPool, config: EngineConfig, image_token_id: int) -> KVManager:
    allocator = PageAllocator(pool.num_pages)
    if config.enable_prefix_cache:
        return RadixKVManager(allocator, config.page_size, image_token_id)
    return KVManager(allocator, config.page_size)

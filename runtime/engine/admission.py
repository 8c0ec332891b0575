"""Admission checks: a request the engine could never serve is refused with a typed error before it queues."""
from __future__ import annotations

from epdlang.errors import InvalidRequest, PromptTooLong
from runtime.config import EngineConfig
from runtime.messages import GenerateRequest


def check_fits(msg: GenerateRequest, config: EngineConfig, vocab_size: int, kv_slots: int) -> None:
    """Raise `InvalidRequest` or `PromptTooLong` unless the prompt and its whole output fit the model and pool."""
    n = len(msg.input_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty")
    bad = [t for t in msg.input_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if n >= config.max_model_len:
        raise PromptTooLong(f"the prompt has {n} tokens; the context allows at most {config.max_model_len - 1}")
    need = n + min(msg.sampling.max_new_tokens, config.max_model_len - n)
    if need > kv_slots:
        raise PromptTooLong(f"the request needs {need} KV slots but the pool only has {kv_slots}")

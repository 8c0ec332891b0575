"""Engine configuration (one frozen dataclass, overridable by keyword) and the latency targets it is held to."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

OverlapMode = bool | Literal["auto"]  # `EngineConfig.overlap_encode`: on, off, or chosen per encode
OVERLAP_MODES: dict[str, OverlapMode] = {"auto": "auto", "on": True, "off": False}  # `--overlap-encode` names
ENCODE_TOKENS_ACCELERATOR = 4096
# On CPU a larger tower batch is no faster per image (448² image: 128 ms alone, 146-156 ms each in batches
# of 2-8 at 2 threads), and a long pass holds back the first request's prefill and its thread split.
ENCODE_TOKENS_CPU = 256
# On CPU a decode step beside the vision tower takes cores from it, and a step of a few rows costs nearly
# what a full one does (the weights are read either way). At 448², 64 in flight, one-row decode steps every
# ~5 ms halved the tower's speed (2638 decode passes for 128 requests). Fewer rows than DECODE_WAIT_ROWS
# wait for the tower, at most DECODE_WAIT_MS_CPU after the last decode step: well inside a 100 ms TPOT.
DECODE_WAIT_MS_CPU = 50.0
DECODE_WAIT_ROWS = 16
# The budgets `epd serve` uses on a CPU host, for the planner's model of it (runtime.planner.sim.Budgets).
CPU_HOST = {"encode_token_budget": ENCODE_TOKENS_CPU, "decode_wait_ms": DECODE_WAIT_MS_CPU}


@dataclass(frozen=True)
class EngineConfig:
    dtype: str = "float32"
    device: str = "cpu"
    attention_backend: str = "auto"
    linear_backend: str = "auto"  # "onednn" (CPU fp32: prepacked weights, models/linear.py) or "torch"
    page_size: int = 16
    num_pages: int | None = None  # None: derived from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_model_len: int = 16384
    max_running: int = 256
    prefill_token_budget: int = 2048  # tokens per prefill batch; longer prompts are chunked
    mixed_token_budget: int | None = None  # prefill tokens per step while requests decode; None: the above
    encode_token_budget: int | None = None  # image tokens per encode batch; None: by device (`encode_tokens`)
    schedule_policy: Literal["decode-first", "prefill-first"] = "decode-first"
    mixed_batches: bool = True  # decode tokens ride in the prefill's forward pass (one read of the weights)
    enable_prefix_cache: bool = True
    encoder_cache_bytes: int = 256 << 20
    tpot_target_ms: float | None = None  # when set, budgets are calibrated at start-up
    # the vision tower on a second thread beside LM work: True, False, or "auto" (chosen per encode from each
    # stage's share of the recent pass time: runtime/engine/overlap.py)
    overlap_encode: OverlapMode = "auto"
    decode_wait_ms: float | None = None  # a decode-only step waits this long for the tower; None: by device
    load_vision: bool = True
    load_lm: bool = True
    num_threads: int | None = None
    json_whitespace_flexible: bool = False  # JSON constraints allow any whitespace (default: compact)

    @property
    def encode_tokens(self) -> int:
        if self.encode_token_budget is not None:
            return self.encode_token_budget
        return ENCODE_TOKENS_CPU if self.device == "cpu" else ENCODE_TOKENS_ACCELERATOR

    @property
    def decode_wait_s(self) -> float:
        """How long after the last decode pass a decode-only step may wait for the encode in flight."""
        if self.decode_wait_ms is not None:
            return self.decode_wait_ms / 1e3
        wait = DECODE_WAIT_MS_CPU if self.device == "cpu" else 0.0
        return min(wait, self.tpot_target_ms / 2) / 1e3 if self.tpot_target_ms else wait / 1e3

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Slo:
    """Latency targets: time to first token, and the p90 of one request's own inter-token gaps.

    The defaults are `epd plan`'s and `epd bench`'s, and what `epd serve --role-switching` plans for."""
    ttft_ms: float = 3000.0
    tpot_ms: float = 100.0

    @staticmethod
    def add_arguments(group: Any, defaults: "Slo | None" = None) -> None:
        """`--slo-ttft-ms` and `--slo-tpot-ms` on an argparse parser or group (defaults: `Slo()`'s)."""
        d = defaults or Slo()
        group.add_argument("--slo-ttft-ms", type=float, default=d.ttft_ms, help="time to first token target")
        group.add_argument("--slo-tpot-ms", type=float, default=d.tpot_ms, help="p90 inter-token gap target")

    @classmethod
    def from_args(cls, args: Any) -> "Slo":
        return cls(args.slo_ttft_ms, args.slo_tpot_ms)

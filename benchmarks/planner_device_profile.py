"""Write the device profile `epd plan --gpus N` reads: Qwen2-VL-7B stage costs on one H100, derived from
published figures with a roofline model (no GPU was available to measure on).

    .venv/bin/python -m benchmarks.planner_device_profile [--out runtime/planner/devices/h100-qwen2-vl-7b.json]

Each cost is max(compute / (peak x efficiency), bytes / (bandwidth x efficiency)) plus a fixed overhead
per step. The figures and the assumptions are written into the file beside the tables.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "runtime" / "planner" / "devices" / "h100-qwen2-vl-7b.json"
SOURCES = [
    "NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS dense BF16, 3.35 TB/s HBM3, NVLink 900 GB/s",
    "Wang et al. 2024, Qwen2-VL (arXiv:2409.12191), Table 1: Qwen2-VL-7B = 675M-parameter ViT + 7.6B LLM",
    "Qwen/Qwen2-7B config.json: 28 layers, hidden 3584, 28 query / 4 KV heads of 128; "
    "Qwen2-VL vision config: 32 layers, hidden 1280, 14 px patches, 2x2 merge",
]
PEAK_FLOPS = 989e12
HBM_BPS = 3.35e12
LM_PARAMS, VIT_PARAMS = 7.6e9, 0.675e9
LM_LAYERS, LM_HIDDEN, KV_HEADS, HEAD_DIM = 28, 3584, 4, 128
VIT_LAYERS, VIT_HIDDEN = 32, 1280
BYTES = 2  # bf16
ASSUME = {"prefill_mfu": 0.5, "vision_mfu": 0.4, "decode_bw_efficiency": 0.75, "decode_mfu": 0.5,
          "step_overhead_ms": 1.5, "encode_overhead_ms": 2.0, "transfer_GBps": 25.0, "transfer_fixed_ms": 0.1}
KV_BYTES_PER_TOKEN = 2 * LM_LAYERS * KV_HEADS * HEAD_DIM * BYTES


def encode_ms(tokens: int, batch: int) -> float:
    patches = 4 * tokens  # merged tokens are 2x2 patches
    flops = batch * (2 * VIT_PARAMS * patches + 4 * VIT_LAYERS * patches**2 * VIT_HIDDEN)
    return ASSUME["encode_overhead_ms"] + flops / (PEAK_FLOPS * ASSUME["vision_mfu"]) * 1e3


def prefill_ms(tokens: int) -> float:
    flops = 2 * LM_PARAMS * tokens + 2 * LM_LAYERS * tokens**2 * LM_HIDDEN  # causal attention: half of 4 n^2 d
    weights = LM_PARAMS * BYTES / (HBM_BPS * ASSUME["decode_bw_efficiency"])
    return ASSUME["step_overhead_ms"] + max(flops / (PEAK_FLOPS * ASSUME["prefill_mfu"]), weights) * 1e3


def decode_ms(batch: int, context: int) -> float:
    nbytes = LM_PARAMS * BYTES + batch * context * KV_BYTES_PER_TOKEN
    memory = nbytes / (HBM_BPS * ASSUME["decode_bw_efficiency"])
    flops = 2 * LM_PARAMS * batch + 4 * LM_LAYERS * batch * context * LM_HIDDEN
    compute = flops / (PEAK_FLOPS * ASSUME["decode_mfu"])
    return ASSUME["step_overhead_ms"] + max(memory, compute) * 1e3


def profile() -> dict:
    table = {
        "encode_ms": {str(t): {str(b): round(encode_ms(t, b), 4) for b in (1, 4, 16)} for t in (16, 64, 256, 1024)},
        "prefill_ms": {str(n): round(prefill_ms(n), 4) for n in (16, 128, 512, 1024, 2048, 4096, 8192)},
        "decode_ms": {str(c): {str(b): round(decode_ms(b, c), 4) for b in (1, 8, 32, 64, 128, 256)}
                      for c in (128, 1024, 4096)},
    }
    return {"kind": "epd-device-profile", "version": 1, "device": "NVIDIA H100 SXM5 80GB, one per instance",
            "model": "Qwen2-VL-7B-Instruct, bf16", "source": "derived from published figures (roofline), not measured",
            "sources": SOURCES, "assumptions": ASSUME | {
                "front_end": "the API server's preprocessing is assumed scaled out: not a bottleneck (0 ms)",
                "transfer": "embeddings and KV over a mix of NVLink (in a node) and 400 Gb/s InfiniBand (across)"},
            "threads": {"1": table}, "front_ms": {"per_request": 0.0, "per_image": 0.0},
            "transfer": {"gpu": {"fixed_ms": ASSUME["transfer_fixed_ms"],
                                 "ms_per_byte": 1e3 / (ASSUME["transfer_GBps"] * 1e9)}},
            "data_plane": "gpu", "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "embed_bytes_per_token": LM_HIDDEN * BYTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile(), indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

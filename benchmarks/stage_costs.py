"""Stage costs of one model on this machine, and the FLOP/s they reach beside one large matmul.

    .venv/bin/python benchmarks/stage_costs.py [--model DIR] [--batch 16] [--prompt 108] [--json FILE]
                                               [--profile]

Times, best of a few runs in one process: the vision tower on 224^2 images, one prefill of PROMPT
tokens, and a decode step of BATCH sequences, each with the `torch` (MKL) and the `onednn` linear
backends; then one fp32 matmul of the decode step's largest projection shape and one large square matmul.
With `--profile`, it also prints torch profiler tables (ops by self CPU time) of a tower pass of four 224^2
images and of a decode step of BATCH sequences, with the default linear backend.
"""
from __future__ import annotations

import argparse
import json

import torch

from epdlang.sampling import SamplingParams
from runtime.engine.calibrate import best_ms
from runtime.engine.core import Engine
from runtime.tiny_model import ensure_tiny_model


def lm_flops_per_token(cfg) -> float:
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return 2.0 * per_layer * t.num_layers


def start_decoding(eng: Engine, batch: int, prompt: int) -> None:
    """Queue `batch` prompts of `prompt` tokens and step until all are prefilled: the next steps decode."""
    for i in range(batch):
        eng.add_request(input_ids=list(range(200 + i, 200 + i + prompt)),
                        sampling_params=SamplingParams(max_new_tokens=64, ignore_eos=True))
    while eng.scheduler.waiting:
        eng.step()


def measure(model: str, backend: str, batch: int, prompt: int) -> dict:
    eng = Engine(model, linear_backend=backend, enable_prefix_cache=False, overlap_encode=False)
    cfg = eng.model.config
    pixels, grid = eng.model.dummy_image(64)  # one 224^2 image (64 merged tokens)
    encode = best_ms(lambda: eng.runner.encode([pixels], grid.tolist()))
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    prefill = best_ms(lambda: eng.generate({"input_ids": list(range(100, 100 + prompt))}, one))
    start_decoding(eng, batch, prompt)
    decode = best_ms(eng.step, repeats=10)
    per_token = lm_flops_per_token(cfg)
    head = 2.0 * cfg.text.hidden_size * cfg.text.vocab_size
    return {"backend": backend, "encode_ms_per_224_image": round(encode, 2), "prefill_ms": round(prefill, 2),
            "prefill_gflops": round((prompt * per_token + head) / prefill / 1e6, 1),
            "decode_step_ms": round(decode, 2), "decode_gflops": round(batch * (per_token + head) / decode / 1e6, 1)}


def profile_stages(model: str, batch: int, prompt: int) -> None:
    """Ops by self CPU time: 5 tower passes of four 224^2 images, then 10 decode steps of `batch` rows."""
    eng = Engine(model, enable_prefix_cache=False, overlap_encode=False)
    pixels, grid = eng.model.dummy_image(64)
    tower = lambda: eng.runner.encode([pixels] * 4, grid.tolist() * 4)  # noqa: E731
    start_decoding(eng, batch, prompt)
    for name, fn, n in (("tower pass, 4 images of 224^2", tower, 5), (f"decode step, {batch} rows", eng.step, 10)):
        fn()
        with torch.profiler.profile() as prof:
            for _ in range(n):
                fn()
        print(f"{name}, {n} times:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def matmul_gflops(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(n, k)
    return round(2.0 * m * k * n / best_ms(lambda: torch.nn.functional.linear(a, b), 10) / 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=108)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="also print torch profiler tables")
    args = ap.parse_args()
    model = args.model or str(ensure_tiny_model())
    rows = [measure(model, b, args.batch, args.prompt) for b in ("torch", "onednn")]
    t = Engine(model, load_vision=False).model.config.text
    result = {"model": model, "threads": torch.get_num_threads(), "batch": args.batch, "prompt": args.prompt,
              "stages": rows,
              "matmul_gflops": {f"{args.batch}x{t.hidden_size}x{2 * t.intermediate_size} (MKL)":
                                matmul_gflops(args.batch, t.hidden_size, 2 * t.intermediate_size),
                                "2048x1024x1024 (MKL)": matmul_gflops(2048, 1024, 1024)}}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:
        profile_stages(model, args.batch, args.prompt)


if __name__ == "__main__":
    main()

"""Prefix + encoder cache benefit: one 448x448 image asked 32 different questions, caches on vs off.

    python benchmarks/prefix_cache.py [--num-questions 32] [--output-len 16] [--model DIR]
"""
from __future__ import annotations

import argparse
import time

from epdlang.sampling import SamplingParams
from offline_kit import image_request, synthetic_image, text_of_tokens, write_result
from runtime.engine.core import Engine
from runtime.tiny_model import ensure_tiny_model


def run(model: str, caches: bool, n: int, output_len: int) -> dict:
    overrides = {} if caches else {"enable_prefix_cache": False, "encoder_cache_bytes": 0}
    engine = Engine(model, **overrides)
    image = synthetic_image(7, (448, 448))
    reqs = [image_request(image, text_of_tokens(engine.processor.tokenizer, 16, i)) for i in range(n)]
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    engine.generate(reqs[:1], SamplingParams(max_new_tokens=1))  # warm-up (and, with caches, the first visit)
    t0 = time.perf_counter()
    outs = engine.generate(reqs, params)
    elapsed = time.perf_counter() - t0
    cached = sum(o.cached_tokens for o in outs)
    prompt = sum(o.prompt_tokens for o in outs)
    cache = engine.encoder_cache
    lookups = cache.hits + engine.stats["images_encoded"]
    return {"caches": caches, "elapsed_s": round(elapsed, 3), "req_per_s": round(n / elapsed, 2),
            "images_encoded": engine.stats["images_encoded"],
            "encoder_cache_hit_rate": round(cache.hits / lookups, 3) if lookups else 0.0,
            "prompt_tokens": prompt, "cached_tokens": cached,
            "prefix_hit_rate": round(cached / prompt, 3), "stage_seconds": dict(engine.stage_seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-questions", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    args = ap.parse_args()
    model = str(args.model or ensure_tiny_model())
    on, off = (run(model, c, args.num_questions, args.output_len) for c in (True, False))
    write_result("prefix_cache", {"model": model, "num_questions": args.num_questions,
                                  "speedup": round(on["req_per_s"] / off["req_per_s"], 2), "on": on, "off": off})


if __name__ == "__main__":
    main()

"""Offline engine throughput: N requests, one image each, short question, fixed output length.

    python benchmarks/engine_offline.py [--num-prompts 64] [--image-sizes 224,448] [--model DIR]
"""
from __future__ import annotations

import argparse
import time

from epdlang.sampling import SamplingParams
from offline_kit import image_request, synthetic_image, text_of_tokens, write_result
from runtime.engine.core import Engine
from runtime.tiny_model import ensure_tiny_model


def run(engine: Engine, num_prompts: int, side: int, input_len: int, output_len: int) -> dict:
    tok = engine.processor.tokenizer
    reqs = [image_request(synthetic_image(1000 * side + i, (side, side)), text_of_tokens(tok, input_len, i))
            for i in range(num_prompts)]
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    engine.flush_cache()
    engine.stage_seconds.clear()
    t0 = time.perf_counter()
    outs = engine.generate(reqs, params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.token_ids) for o in outs)
    stages = dict(engine.stage_seconds)
    busy = sum(stages.values())
    return {
        "image_size": side, "num_prompts": num_prompts, "elapsed_s": round(elapsed, 3),
        "req_per_s": round(num_prompts / elapsed, 2), "output_tok_per_s": round(out_tokens / elapsed, 1),
        "stage_share": {k: round(v / busy, 3) for k, v in stages.items()},
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "preprocess_and_overhead_s": round(elapsed - busy, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--image-sizes", default="224,448")
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    args = ap.parse_args()
    engine = Engine(args.model or ensure_tiny_model())
    run(engine, 4, 224, args.input_len, 4)  # warm-up
    results = [run(engine, args.num_prompts, int(s), args.input_len, args.output_len)
               for s in args.image_sizes.split(",")]
    write_result("engine_offline", {"model": engine.model_path, "config": engine.config.__dict__,
                                    "runs": results})


if __name__ == "__main__":
    main()

"""Offline engine throughput: N requests, one image each, short question, fixed output length.

    python benchmarks/engine_offline.py [--num-prompts 64] [--image-sizes 224,448] [--model DIR]
                                        [--concurrency C] [--overlap-encode auto|on|off]

With `--concurrency C` it keeps C requests in flight (a new one each time one finishes), as the closed-loop
client of `compare.sh` does; without, all N are queued at once. No HTTP, no client and no other process:
the engine (preprocessing included) has the whole machine, so its rate bounds what serving can reach.
"""
from __future__ import annotations

import argparse
import resource
import time

from epdlang.sampling import SamplingParams
from offline_kit import image_request, synthetic_image, text_of_tokens, write_result
from runtime.config import OVERLAP_MODES
from runtime.engine.core import Engine
from runtime.tiny_model import ensure_tiny_model


def closed_loop(engine: Engine, reqs: list[dict], params: SamplingParams, concurrency: int) -> int:
    """Run `reqs` keeping at most `concurrency` in flight; returns the number of output tokens."""
    pending, in_flight, tokens = list(reversed(reqs)), set(), 0
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            in_flight.add(engine.add_request(sampling_params=params, **pending.pop()))
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                in_flight.discard(out.rid)
    return tokens


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(engine: Engine, num_prompts: int, side: int, input_len: int, output_len: int,
        concurrency: int = 0) -> dict:
    tok = engine.processor.tokenizer
    reqs = [image_request(synthetic_image(1000 * side + i, (side, side)), text_of_tokens(tok, input_len, i))
            for i in range(num_prompts)]
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    engine.flush_cache()
    engine.stage_seconds.clear()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if concurrency:
        out_tokens = closed_loop(engine, reqs, params, concurrency)
    else:
        out_tokens = sum(len(o.token_ids) for o in engine.generate(reqs, params))
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    stages = dict(engine.stage_seconds)
    busy = sum(stages.values())
    return {
        "image_size": side, "num_prompts": num_prompts, "concurrency": concurrency or num_prompts,
        "elapsed_s": round(elapsed, 3), "req_per_s": round(num_prompts / elapsed, 2),
        "cpu_s": round(cpu, 2),  # the process's user + system seconds, all threads
        "output_tok_per_s": round(out_tokens / elapsed, 1),
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
    ap.add_argument("--concurrency", type=int, default=0, help="requests in flight; 0: all at once")
    ap.add_argument("--overlap-encode", choices=tuple(OVERLAP_MODES), default="auto")
    args = ap.parse_args()
    engine = Engine(args.model or ensure_tiny_model(), overlap_encode=OVERLAP_MODES[args.overlap_encode])
    run(engine, 4, 224, args.input_len, 4)  # warm-up
    results = [run(engine, args.num_prompts, int(s), args.input_len, args.output_len, args.concurrency)
               for s in args.image_sizes.split(",")]
    write_result("engine_offline", {"model": engine.model_path, "config": engine.config.__dict__,
                                    "runs": results})


if __name__ == "__main__":
    main()

"""Decode step time when running requests have different context lengths (in-process engine, greedy).

    .venv/bin/python -m benchmarks.decode_context_mix --mix 63x128,1x2048 [--model M] [--threads 2] [--no-grouping]

`--mix` lists count x prompt tokens. Every request decodes through the timed steps (ignore_eos); the
steps are timed once all of them run. `--no-grouping` pads every row to the longest context in one SDPA
call, as the backend did before `group_by_length`. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from epdlang.sampling import SamplingParams
from runtime.messages import GenerateRequest
from runtime.models import attention
from runtime.tiny_model import resolve_model

STEPS = 20


def parse_mix(mix: str) -> list[int]:
    lens = []
    for part in mix.split(","):
        count, tokens = part.split("x")
        lens += [int(tokens)] * int(count)
    return lens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--mix", default="63x128,1x2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-grouping", action="store_true")
    args = p.parse_args()
    if args.no_grouping:
        attention.group_by_length = lambda pages, **kw: [list(range(len(pages)))]
    from runtime.engine.core import Engine

    eng = Engine(resolve_model(args.model), enable_prefix_cache=False, overlap_encode=False)
    eng.set_num_threads(args.threads)
    rng, lens = np.random.default_rng(0), parse_mix(args.mix)
    params = SamplingParams(max_new_tokens=STEPS + 20, ignore_eos=True, temperature=0.0)
    for i, n in enumerate(lens):
        eng.submit(GenerateRequest(rid=f"r{i}", input_ids=tuple(int(x) for x in rng.integers(10, 7000, n)),
                                   sampling=params))
    while any(not r.output_ids for r in eng.reqs.values()):
        eng.step()
    times = []
    for _ in range(STEPS):
        if len(eng.scheduler.running) != len(lens):
            raise RuntimeError(f"{len(eng.scheduler.running)} of {len(lens)} requests running")
        t0 = time.perf_counter()
        eng.step()
        times.append((time.perf_counter() - t0) * 1000.0)
    print(json.dumps({"mix": args.mix, "threads": args.threads, "grouping": not args.no_grouping,
                      "step_ms_min": round(min(times), 2), "step_ms_median": round(statistics.median(times), 2)}))


if __name__ == "__main__":
    main()

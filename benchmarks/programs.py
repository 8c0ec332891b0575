"""DSL programs per second with the compiler's passes on and off, on one topology.

    python benchmarks/programs.py [--instances EPD] [--programs 16] [--agents 8] [--repeats 2]

Two workloads, each run as one `run_batch`:
- multi-image QA: a shared system prompt, three distinct 224x224 images and a question per program;
- the agent loop from `programs/agent_loop.py` (screenshot in, JSON tool call out, several turns).
"On" is the default (`optimize=True`: encode-ahead of every traced image, the batch's common prefix
prefilled once); "off" runs the same programs eagerly. Caches are flushed before every run, and every
QA run uses new images, so no run profits from an earlier one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "programs")]

import epdlang as epd  # noqa: E402
from agent_loop import agent  # noqa: E402
from offline_kit import synthetic_image, write_result  # noqa: E402

SYSTEM = "You are a meticulous visual analyst. Compare images carefully and answer briefly. " * 4


@epd.function
def qa(s, a, b, c, question):
    s += epd.system(SYSTEM)
    s += epd.user(epd.image(a) + epd.image(b) + epd.image(c) + question)
    s += epd.assistant(epd.gen("answer", max_tokens=16))


def qa_batch(n: int, seed: int) -> list[dict]:
    return [{"a": synthetic_image(seed + 3 * i, (224, 224)), "b": synthetic_image(seed + 3 * i + 1, (224, 224)),
             "c": synthetic_image(seed + 3 * i + 2, (224, 224)), "question": f"Which of the three is item {i}?"}
            for i in range(n)]


def timed(rt: epd.Runtime, fn: epd.SglFunction, batch: list[dict], optimize: bool) -> dict:
    flushed = rt.deployment.request_control("flush_cache").result(60)
    if not all(r.get("ok") for r in flushed.values()):
        raise RuntimeError(f"could not flush the caches before a run: {flushed}")
    before = rt.stats()
    t0 = time.perf_counter()
    states = fn.run_batch(batch, backend=rt, optimize=optimize, temperature=0)
    elapsed = time.perf_counter() - t0
    after = rt.stats()
    assert len(states) == len(batch)
    return {"optimize": optimize, "programs": len(batch), "elapsed_s": round(elapsed, 3),
            "programs_per_s": round(len(batch) / elapsed, 3),
            "images_encoded": after["images_encoded"] - before["images_encoded"],
            "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"]}


def best_of(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["programs_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--instances", default="EPD")
    ap.add_argument("--programs", type=int, default=16)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="programs", help="results/NAME.json")
    args = ap.parse_args()
    result: dict = {"instances": args.instances, "workloads": {}}
    with epd.Runtime(model=args.model, instances=args.instances) as rt:
        timed(rt, qa, qa_batch(2, 10_000), True)  # warm-up
        workloads = {"multi_image_qa": (qa, lambda r: qa_batch(args.programs, 1000 * r)),
                     "agent_loop": (agent, lambda r: [{"goal": "Press the blue button."}] * args.agents)}
        for name, (fn, make) in workloads.items():
            runs = {opt: [timed(rt, fn, make(2 * r + opt), bool(opt)) for r in range(args.repeats)] for opt in (1, 0)}
            on, off = best_of(runs[1]), best_of(runs[0])
            ratio = round(on["programs_per_s"] / off["programs_per_s"], 3)
            result["workloads"][name] = {"passes_on": on, "passes_off": off, "speedup": ratio}
            print(f"{name:15s} passes on {on['programs_per_s']:7.2f} prog/s  off {off['programs_per_s']:7.2f} prog/s"
                  f"  ratio {ratio:.2f}x  (encoded on/off: {on['images_encoded']}/{off['images_encoded']},"
                  f" prefill tokens {on['prefill_tokens']}/{off['prefill_tokens']})")
    write_result(args.name, result)


if __name__ == "__main__":
    main()

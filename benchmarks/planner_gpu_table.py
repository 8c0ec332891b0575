"""The recommended E:P:D mix per workload and cluster size, from `epd plan --gpus N` with a device profile.

    .venv/bin/python -m benchmarks.planner_gpu_table [--gpus 8,16,32,64] [--per-gpu 150]

Each cell is one `epd plan tiny-random --dataset W --gpus N --device-profile h100-qwen2-vl-7b` (simulated; the
tiny model's processor gives Qwen2-VL's image-token counts). Requests per run grow with the cluster
(`--per-gpu` x N) so that every size reaches a steady state. Prints a markdown table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cli import build_parser  # noqa: E402
from runtime.config import Slo  # noqa: E402
from runtime.planner.cli import ROLE_WORKLOADS, bench_requests, resolve_model  # noqa: E402
from runtime.planner.plan import build_plan  # noqa: E402

BASE = 200  # distinct requests preprocessed per workload; larger runs repeat them in order

OUT = Path(__file__).resolve().parents[1] / "results" / "planner" / "gpu-table.json"


def plan_args(dataset: str, gpus: int, n: int, args: argparse.Namespace) -> argparse.Namespace:
    """`epd plan`'s own arguments, parsed by its parser, so that every flag it gains has its default here."""
    flags = ["--dataset", dataset, "--num-prompts", str(n), "--image-size", "224", "--input-len", "16",
             "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
             "--device-profile", args.device_profile, "--simulate-top", str(args.simulate_top)]
    return build_parser().parse_args(["plan", "tiny-random", *flags, *(["--gpus", str(gpus)] if gpus else [])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="8,16,32,64")
    p.add_argument("--workloads", default=",".join(ROLE_WORKLOADS))
    p.add_argument("--per-gpu", type=int, default=150, help="requests per GPU in each simulated run")
    p.add_argument("--device-profile", default="h100-qwen2-vl-7b")
    Slo.add_arguments(p, Slo(ttft_ms=1000.0, tpot_ms=50.0))
    p.add_argument("--simulate-top", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    model = resolve_model("tiny-random")
    rows = []
    for dataset in args.workloads.split(","):
        base = bench_requests(plan_args(dataset, 0, BASE, args))
        for gpus in (int(g) for g in args.gpus.split(",")):
            t0 = time.monotonic()
            a = plan_args(dataset, gpus, args.per_gpu * gpus, args)
            result = build_plan(a, model, [base[i % len(base)] for i in range(a.num_prompts)])
            best, colo = result.recommended, result.prediction(result.colocated)
            runner = result.ranked[1] if len(result.ranked) > 1 else best
            rows.append({"workload": dataset, "gpus": gpus, "recommended": best.topology, **best.as_dict(),
                         "runner_up": runner.topology, "runner_up_goodput_rps": runner.goodput_rps,
                         "colocated_goodput_rps": colo.goodput_rps, "wall_s": round(time.monotonic() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nSLO TTFT <= {args.slo_ttft_ms:g} ms, p90 TPOT <= {args.slo_tpot_ms:g} ms; {args.device_profile}\n")
    print("| workload | GPUs | recommended | goodput (req/s) | runner-up | colocated EPD (req/s) | vs EPD |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gp = math.inf if r["goodput_rps"] is None else r["goodput_rps"]  # None: unbounded (a burst meets the SLO)
        ratio = gp / r["colocated_goodput_rps"] if r["colocated_goodput_rps"] else math.inf
        print(f"| {r['workload']} | {r['gpus']} | `{r['recommended']}` | {gp:.1f} | "
              f"`{r['runner_up']}` ({r['runner_up_goodput_rps']:.1f}) | {r['colocated_goodput_rps']:.1f} | "
              f"{ratio:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A workload that shifts from encode-heavy to decode-heavy halfway through, in the planner's simulator on a
GPU cluster (device profile): goodput of every fixed topology against role switching.

    .venv/bin/python -m benchmarks.planner_shift [--gpus 8] [--num-prompts 4000] [--out results/planner/shift.json]

Both halves use the shapes of benchmarks/serving/role_workloads.py. Role switching starts from the
best fixed topology for the first half (what a planner run on the first half would have chosen)
and follows runtime/planner/switching.py. Simulated, not measured: on the 2-core CPU host the
system cannot show the effect (see docs/planner.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.cluster.role_switch import SwitchPolicy  # noqa: E402
from runtime.config import Slo  # noqa: E402
from runtime.planner.cli import bench_requests, device_profile_path, load_json, resolve_model  # noqa: E402
from runtime.planner.costs import ProfileCosts  # noqa: E402
from runtime.planner.search import Planner, Resources, gpu_candidates  # noqa: E402
from runtime.planner.switching import Switcher  # noqa: E402
from runtime.planner.workload import prepare_all, shapes_of, with_output  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "planner" / "shift.json"


BASE = 200  # distinct requests preprocessed; longer runs repeat them (building images is the slow part)


def shapes(dataset: str, n: int, model: Path) -> list:
    from runtime.preprocess import Processor

    args = argparse.Namespace(dataset=dataset, num_prompts=min(n, BASE), seed=0)
    reqs = bench_requests(args)
    prepared, _ = prepare_all(Processor(model), [r.messages for r in reqs])
    base = shapes_of([r.messages for r in reqs], prepared, [r.output_len for r in reqs], lambda *_: 0.0)
    return [base[i % len(base)] for i in range(n)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=4000, help="in all; the first half encode-heavy")
    p.add_argument("--device-profile", default="h100-qwen2-vl-7b")
    Slo.add_arguments(p, Slo(ttft_ms=1000.0, tpot_ms=50.0))
    p.add_argument("--simulate-top", type=int, default=6)
    p.add_argument("--second-output-len", type=int, default=None,
                   help="output tokens of the decode-heavy half (default: its 128)")
    p.add_argument("--window-ms", type=float, default=1000.0, help="switching: the sustained window")
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    model = resolve_model("tiny-random")  # its processor gives Qwen2-VL's image-token counts
    half = args.num_prompts // 2
    enc, dec = shapes("encode-heavy", half, model), shapes("decode-heavy", args.num_prompts - half, model)
    if args.second_output_len:
        dec = with_output(dec, args.second_output_len)
    costs = ProfileCosts(load_json(device_profile_path(args.device_profile)), "gpu")
    slo, res = Slo.from_args(args), Resources(gpus=args.gpus)
    specs = gpu_candidates(args.gpus, max(1, args.gpus // 8))
    first = Planner(enc, costs, slo, res).rank(specs, keep=args.simulate_top)[0]
    whole = Planner(enc + dec, costs, slo, res)
    fixed = whole.rank(specs, keep=args.simulate_top, always=[first.topology, f"{args.gpus}EPD"])
    switchers: list[Switcher] = []

    def with_switching(sim) -> None:
        policy = SwitchPolicy(check_s=args.window_ms / 4000, window_s=args.window_ms / 1000)
        switchers.append(Switcher(sim, whole, policy))
        switchers[-1].install()

    switching = whole.predict(first.topology, setup=with_switching)
    best = fixed[0]
    ratio = switching.goodput_rps / best.goodput_rps if best.goodput_rps else float("inf")
    print(f"{args.gpus} GPUs, {args.num_prompts} requests (encode-heavy, then decode-heavy), SLO TTFT <= "
          f"{slo.ttft_ms:g} ms, p90 TPOT <= {slo.tpot_ms:g} ms")
    print(f"best for the first half alone: {first.topology} ({first.goodput_rps:.1f} req/s on that half)")
    for p in fixed[:8]:
        print(f"  fixed {p.topology:<12} goodput {p.goodput_rps:8.1f} req/s")
    print(f"  role switching from {first.topology}: goodput {switching.goodput_rps:8.1f} req/s "
          f"= {ratio:.2f}x the best fixed ({best.topology})")
    log = switchers[-1].log if switchers else []
    print(f"  switches in the run at the switching goodput: {[(round(t / 1000, 1), n, a, b) for t, n, a, b in log]}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "gpus": args.gpus, "num_prompts": args.num_prompts, "slo": vars(slo), "first_half_best": first.topology,
        "fixed": [{"topology": p.topology, **p.as_dict()} for p in fixed],
        "switching": {"start": first.topology, **switching.as_dict(), "switches": log},
        "ratio_vs_best_fixed": ratio, "wall_s": time.monotonic() - t0}, indent=1))
    print(f"saved {args.out} ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

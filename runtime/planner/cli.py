"""`epd plan MODEL`: profile, simulate every candidate topology, recommend the one with the highest goodput.

    epd plan tiny-random --dataset encode-heavy --num-prompts 60 --slo-ttft-ms 3000 --slo-tpot-ms 100
    epd plan tiny-random --dataset mixed --validate --validate-top 2 --json plan.json
    epd plan tiny-random --dataset decode-heavy --gpus 16 --device-profile runtime/planner/devices/h100-qwen2-vl-7b.json

The workload flags are those of `epd bench` (its datasets, plus the encode-heavy, decode-heavy and
mixed shapes of benchmarks/topology_sweep.py). The workload is built by the repository's benchmarks/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from runtime.config import Slo

ROLE_WORKLOADS = ("encode-heavy", "decode-heavy", "mixed")
DEVICES = Path(__file__).resolve().parent / "devices"


def add_plan_parser(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("plan", help="choose the E:P:D topology for a workload and SLO (simulated)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="model directory, or an alias `epd serve` takes ('tiny-random', ...)")
    w = p.add_argument_group("workload (as `epd bench`)")
    w.add_argument("--dataset", default="fixed", help="an `epd bench` dataset, or encode-heavy|decode-heavy|mixed")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--image-size", type=int, default=224)
    w.add_argument("--input-len", type=int, default=16)
    w.add_argument("--output-len", type=int, default=None)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--request-rate", type=float, default=None, help="judge at this one rate (goodput = it, or 0)")
    w.add_argument("--burstiness", type=float, default=1.0)
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--sweep-rates", default=None, help="comma-separated rates: goodput as `epd bench` computes it")
    Slo.add_arguments(w)
    r = p.add_argument_group("resources")
    r.add_argument("--cores", type=int, default=None, help="CPU cores to plan for (default: this machine's)")
    r.add_argument("--max-instances", type=int, default=None,
                   help="CPU plans: instances at most (default cores+2, at most 6)")
    r.add_argument("--threads-per-instance", type=int, default=None,
                   help="torch threads of each instance (default: the cores split evenly, as `epd serve` does); "
                        "--validate passes it on as `epd serve --num-threads`")
    r.add_argument("--gpus", type=int, default=None, help="plan for N accelerators (one instance each)")
    r.add_argument("--device-profile", default=None, help="stage costs JSON for --gpus (a file, or a name in devices/)")
    r.add_argument("--gpu-unit", type=int, default=None, help="--gpus: count instances in steps of this (default N/8)")
    r.add_argument("--simulate-top", type=int, default=12,
                   help="--gpus: simulate only this many candidates with the highest capacity bound (and EPD)")
    r.add_argument("--mixed-token-budget", type=int, default=None,
                   help="plan (and --validate launches) with `epd serve --mixed-token-budget N`")
    r.add_argument("--transfer", choices=("shm", "zmq"), default="shm", help="data plane")
    r.add_argument("--candidates", default=None, help="';'-separated specs to consider (default: all that fit)")
    o = p.add_argument_group("profile, validation and output")
    o.add_argument("--profile", default=None, help="profile JSON to read and extend (default: the cache)")
    o.add_argument("--stream-ms-per-token", type=float, default=None,
                   help="override the profile's API-server CPU per streamed token")
    o.add_argument("--client-ms-per-token", type=float, default=None,
                   help="override the profile's client CPU per streamed token (the benchmark client's)")
    o.add_argument("--validate", action="store_true", help="launch the top K and EPD with `epd bench` and compare")
    o.add_argument("--validate-top", type=int, default=2)
    o.add_argument("--launch-args", default="", help="extra `epd serve` flags for --validate")
    o.add_argument("--launch-timeout", type=float, default=300.0)
    o.add_argument("--num-warmups", type=int, default=8, help="--validate: untimed requests, sent at once")
    o.add_argument("--result-dir", default=None, help="--validate: where server logs and per-request results (JSON) go")
    o.add_argument("--json", dest="json_file", default=None, help="write the plan as JSON")
    p.set_defaults(handler=plan)


def repo_benchmarks() -> None:
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.append(root)


def bench_requests(args: argparse.Namespace) -> list:
    repo_benchmarks()
    from benchmarks.serving.role_workloads import build_role_workload
    from benchmarks.serving.workloads import WorkloadConfig, build_workload

    if args.dataset in ROLE_WORKLOADS:
        return build_role_workload(args.dataset, args.num_prompts, args.seed)
    return build_workload(WorkloadConfig(args.dataset, args.num_prompts, args.seed, args.output_len,
                                         args.input_len, args.image_size))


def resolve_model(name: str) -> Path:
    from runtime.tiny_model import resolve_model as serve_alias  # the aliases `epd serve` accepts

    return Path(serve_alias(name))


def parse_rates(text: str | None, single: float | None = None) -> list[float] | None:
    """The rates to judge at: a sweep, one rate, or None (search for the knee)."""
    if not text:
        return [single] if single else None
    rates = sorted(float(x) for x in text.split(",") if x.strip())
    if not rates or any(not math.isfinite(x) or x <= 0 for x in rates):
        raise SystemExit(f"--sweep-rates {text!r}: need finite positive rates")
    return rates


def check(args: argparse.Namespace) -> None:
    if args.gpus is not None and (args.gpus < 1 or not args.device_profile):
        raise SystemExit("--gpus N needs N >= 1 and --device-profile FILE")
    if args.gpus and args.validate:
        raise SystemExit("--validate runs topologies on this machine; it does not combine with --gpus")
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be at least 1")
    if args.mixed_token_budget is not None and args.mixed_token_budget < 1:
        raise SystemExit(f"--mixed-token-budget must be at least 1, got {args.mixed_token_budget}")


def plan(args: argparse.Namespace) -> int:
    from runtime.planner.plan import build_plan, print_plan

    check(args)
    result = build_plan(args, resolve_model(args.model), bench_requests(args))
    if args.validate:
        repo_benchmarks()
        from benchmarks.planner_validate import validate

        validate(args, result)
    print_plan(result)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(result.as_json(), indent=1))
        print(f"saved {args.json_file}")
    return 0


def device_profile_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    named = DEVICES / (name if name.endswith(".json") else f"{name}.json")
    if named.is_file():
        return named
    raise SystemExit(f"--device-profile {name!r}: no such file (named profiles: "
                     f"{', '.join(sorted(p.stem for p in DEVICES.glob('*.json')))})")


def default_cores(args: argparse.Namespace) -> int:
    return args.cores or os.cpu_count() or 1


def profile_cache_dir() -> Path:
    from runtime.tiny_model import cache_root

    return cache_root() / "profiles"


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())

"""Put the planner together: profile (or device profile), workload shapes, candidates, ranking, output."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.config import CPU_HOST, Slo
from runtime.planner import cli
from runtime.planner.costs import ProfileCosts
from runtime.planner.search import Planner, Prediction, Resources, cpu_candidates, gpu_candidates
from runtime.planner.sim import Budgets
from runtime.planner.workload import prepare_all, shapes_of

log = logging.getLogger(__name__)
SHOWN = 10


@dataclass
class PlanResult:
    ranked: list[Prediction]
    colocated: str
    profile: dict[str, Any]
    planner: Planner
    profile_path: str | None = None
    measured: dict[str, dict] = field(default_factory=dict)

    @property
    def recommended(self) -> Prediction:
        return self.ranked[0]

    def prediction(self, spec: str) -> Prediction:
        return next(p for p in self.ranked if p.topology == spec)

    def as_json(self) -> dict[str, Any]:
        return {"recommended": self.recommended.topology,
                "runner_up": self.ranked[1].topology if len(self.ranked) > 1 else None,
                "colocated": self.colocated,
                "candidates": [{"topology": p.topology, "predicted": p.as_dict(),
                                "measured": self.measured.get(p.topology)} for p in self.ranked],
                "profile": self.profile}


def resources(args: argparse.Namespace) -> Resources:
    if args.gpus:
        return Resources(gpus=args.gpus)
    return Resources(cores=cli.default_cores(args), threads_per_instance=args.threads_per_instance)


def candidates(args: argparse.Namespace) -> list[str]:
    if args.candidates:
        return [s.strip() for s in args.candidates.split(";") if s.strip()]
    if args.gpus:
        return gpu_candidates(args.gpus, args.gpu_unit or max(1, args.gpus // 8))
    cores = cli.default_cores(args)
    return cpu_candidates(args.max_instances or min(6, cores + 2))


def colocated_spec(args: argparse.Namespace) -> str:
    return f"{args.gpus}EPD" if args.gpus and args.gpus > 1 else "EPD"


def measured_costs(args: argparse.Namespace, model_dir: Path, requests: list, specs: list[str]):
    from runtime.planner import profile

    path = Path(args.profile) if args.profile else profile.cache_path(model_dir, cli.profile_cache_dir())
    data = profile.load_or_new(path, model_dir)
    profiler = profile.Profiler(model_dir, data)
    try:
        prepared, images = prepare_all(serving_processor(model_dir), [r.messages for r in requests])
        res = resources(args)
        threads = sorted({t for s in specs for _, _, t in res.nodes(s)})
        measured = [profiler.ensure(t, images) for t in threads]
        profiler.transfers()
        shapes = shapes_of([r.messages for r in requests], prepared, [r.output_len for r in requests],
                           profiler.front)
    finally:
        profiler.close()
    profile.save(path, data)
    print(f"profile: {path} ({'measured now' if any(measured) else 'from the cache'})")
    return ProfileCosts(data, args.transfer), shapes, data, str(path)


def serving_processor(model_dir: Path):
    """Preprocessing as the API server does it, so pixel bytes are the ones it sends."""
    from runtime.preprocess import Processor

    return Processor(model_dir, compact_pixels=True)


def device_costs(args: argparse.Namespace, model_dir: Path, requests: list):
    path = cli.device_profile_path(args.device_profile)
    data = cli.load_json(path)
    front = data["front_ms"]
    prepared, _ = prepare_all(serving_processor(model_dir), [r.messages for r in requests])
    shapes = shapes_of([r.messages for r in requests], prepared, [r.output_len for r in requests],
                       lambda key, msgs, n: front["per_request"] + n * front["per_image"])
    print(f"device profile: {path} ({data.get('device', '?')}; source: {data.get('source', '?')})")
    return ProfileCosts(data, data.get("data_plane", args.transfer)), shapes, data, str(path)


def build_plan(args: argparse.Namespace, model_dir: Path, requests: list) -> PlanResult:
    specs = candidates(args)
    colocated = colocated_spec(args)
    if colocated not in specs:
        specs.append(colocated)
    if args.gpus:
        costs, shapes, data, path = device_costs(args, model_dir, requests)
    else:
        costs, shapes, data, path = measured_costs(args, model_dir, requests, specs)
    host = {} if args.gpus else CPU_HOST
    budgets = Budgets(**{**host, **data.get("budgets", {}), "mixed_token_budget": args.mixed_token_budget})
    for name in ("stream_ms_per_token", "client_ms_per_token"):
        if getattr(args, name, None) is not None:
            setattr(costs, name, getattr(args, name))
    planner = Planner(shapes, costs, Slo.from_args(args), resources(args), budgets,
                      args.burstiness, args.seed, args.max_concurrency)
    keep = args.simulate_top if args.gpus else None
    ranked = planner.rank(specs, cli.parse_rates(args.sweep_rates, args.request_rate), keep, [colocated])
    return PlanResult(ranked, colocated, data, planner, path)


def fmt(value: float | None, spec: str = ".2f") -> str:
    if value is not None and value == float("inf"):
        return "burst"  # every request at once meets the SLO
    return "-" if value is None or value != value else format(value, spec)


def print_plan(result: PlanResult) -> None:
    shown = result.ranked[:SHOWN]
    if result.colocated not in [p.topology for p in shown]:
        shown.append(result.prediction(result.colocated))
    print(f"{'topology':<14}{'goodput':>9}{'TTFT p90':>10}{'TPOT p90':>10}   measured: {'goodput':>8}"
          f"{'TTFT p90':>10}{'TPOT p90':>10}")
    for p in shown:
        m = result.measured.get(p.topology) or {}
        print(f"{p.topology:<14}{fmt(p.goodput_rps):>9}{fmt(p.ttft_p90_ms, '.0f'):>10}{fmt(p.tpot_p90_ms, '.1f'):>10}"
              f"             {fmt(m.get('goodput_rps')):>8}{fmt(m.get('ttft_p90_ms'), '.0f'):>10}"
              f"{fmt(m.get('tpot_p90_ms'), '.1f'):>10}")
    best, colo = result.recommended, result.prediction(result.colocated)
    runner = result.ranked[1].topology if len(result.ranked) > 1 else "-"
    ratio = best.goodput_rps / colo.goodput_rps if colo.goodput_rps else float("inf")
    print(f"recommended: {best.topology} ({best.goodput_rps:.2f} req/s predicted goodput); runner-up: {runner}; "
          f"colocated {colo.topology}: {colo.goodput_rps:.2f} req/s ({ratio:.2f}x)")

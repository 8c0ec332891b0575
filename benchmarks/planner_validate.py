"""`epd plan --validate`: run the top K candidates and the colocated EPD for real, as `epd bench --launch` does.

Each topology is started with `epd serve` on a free port (benchmarks/serving/launch.py), sent the plan's
workload at each rate of a sweep (benchmarks/serving/cli.run_system, with ignore_eos so every request
generates its planned length), and stopped. Measured goodput uses the same interpolation as
`epd bench --sweep-rates`; the simulator is run at the same rates so that attainment can be compared
point by point. Without --sweep-rates, each topology is swept around its own predicted goodput.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

from benchmarks.serving.cli import run_system
from benchmarks.serving.launch import launched_server
from benchmarks.serving.metrics import goodput, summarize
from runtime.cluster.server_process import REPO_ROOT
from runtime.cluster.topology import parse_topology

AROUND = (0.5, 0.75, 1.0, 1.25, 1.5)  # x predicted goodput, when no rates are given


def bench_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """The `epd bench` options `run_system` reads, from the plan's options."""
    return argparse.Namespace(model=None, api_key=None, ignore_eos=True, request_timeout=600.0,
                              slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, dataset=args.dataset,
                              burstiness=args.burstiness, seed=args.seed, max_concurrency=args.max_concurrency,
                              disable_tqdm=True, save_result=bool(args.result_dir), sweep_rates=None,
                              result_dir=args.result_dir or ".")


def rates_for(args: argparse.Namespace, predicted_rps: float) -> list[float]:
    if args.sweep_rates:
        return sorted(float(x) for x in args.sweep_rates.split(",") if x.strip())
    base = predicted_rps if predicted_rps > 0 else 0.25
    return [round(base * k, 3) for k in AROUND]


def warmups_for(args: argparse.Namespace) -> list:
    """Untimed requests (their own images) sent at once before the first rate point."""
    from runtime.planner.cli import bench_requests

    if not args.num_warmups:
        return []
    return bench_requests(argparse.Namespace(**{**vars(args), "seed": args.seed + 7919,
                                                "num_prompts": args.num_warmups}))


def fresh_requests(args: argparse.Namespace, k: int) -> list:
    """The plan's workload with other images and words for the k-th rate point: a server's encoder and
    prefix caches would otherwise serve every point after the first from cache (same arrival times)."""
    from runtime.planner.cli import bench_requests

    return bench_requests(argparse.Namespace(**{**vars(args), "seed": args.seed + 1 + 7 * k}))


STAGE_METRIC = re.compile(r'^epd_instance_stage_(seconds|passes)_total\{instance="([^"]+)".*stage="(\w+)"\} (\S+)$')


def stage_totals(url: str) -> dict[tuple[str, str, str], float]:
    """(seconds|passes, instance, stage) -> total so far, from the server's /metrics."""
    import httpx

    return parse_stage_totals(httpx.get(f"{url}/metrics", timeout=30).text)


def parse_stage_totals(metrics_text: str) -> dict[tuple[str, str, str], float]:
    return {m.group(1, 2, 3): float(m.group(4)) for m in map(STAGE_METRIC.match, metrics_text.splitlines()) if m}


def stage_delta(before: dict, after: dict) -> dict[str, dict[str, tuple[int, float]]]:
    """instance -> stage -> (passes, seconds) between two /metrics reads: the form of `Outcome.stages`."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for (kind, inst, stage), v in after.items():
        if kind == "passes" and v > before.get((kind, inst, stage), 0.0):
            secs = after.get(("seconds", inst, stage), 0.0) - before.get(("seconds", inst, stage), 0.0)
            out.setdefault(inst, {})[stage] = (round(v - before.get((kind, inst, stage), 0.0)), round(secs, 3))
    return out


INSTANCE_NAME = re.compile(r'"name": "([^"]+)"')


def process_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the API server ("api") and each of its instances (by name), from /proc; empty
    where there is no /proc. (The client's comes from the benchmark: this process also builds the requests.)"""
    if not os.path.isdir(f"/proc/{server_pid}"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in [d for d in os.listdir("/proc") if d.isdigit()]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        name = "api" if int(pid) == server_pid else None
        if int(stat[1]) == server_pid and (m := INSTANCE_NAME.search(cmd)):
            name = m.group(1)
        if name:
            out[name] = (int(stat[11]) + int(stat[12])) / tick
    return out


def measure(args: argparse.Namespace, spec: str, rates: list[float], warmups: list) -> tuple[list, list]:
    """The run points of each rate, and where each point's time went: forward passes per instance and stage
    (`stage_delta`) and CPU seconds per process (`process_cpu`), under "cpu"."""
    log_dir = Path(args.result_dir) if args.result_dir else REPO_ROOT / "results" / "planner" / "logs"
    extra = shlex.split(args.launch_args)
    if args.mixed_token_budget:
        extra += ["--mixed-token-budget", str(args.mixed_token_budget)]
    if args.threads_per_instance:
        count = len(parse_topology(spec).instances)
        extra += ["--num-threads", str(args.threads_per_instance * count)]
    points, stages = [], []
    with launched_server(spec, args.model, extra, log_dir, args.launch_timeout) as (url, proc):
        run_system(bench_namespace(args), spec, url, [], warmups, [], "")
        for k, rate in enumerate(rates):
            before, cpu = stage_totals(url), process_cpu(proc.pid)
            point, = run_system(bench_namespace(args), spec, url, fresh_requests(args, k), [], [rate],
                                time.strftime("%H%M%S"))
            points.append(point)
            after = process_cpu(proc.pid)
            cpu = {name: round(after[name] - cpu[name], 2) for name in after if name in cpu}
            cpu |= {"client": round(point.client_cpu_s, 2)} if cpu else {}
            stages.append(stage_delta(before, stage_totals(url)) | {"cpu": cpu})
    return points, stages


def p90(summary: Any, field: str) -> float:
    return float(getattr(summary, field)["p90"])


def measured_entry(points: list, stages: list, predicted: dict[float, Any]) -> dict[str, Any]:
    pairs = [(pt.rate, pt.attainment) for pt in points]
    gp = goodput(pairs)
    passing = [pt for pt in points if pt.attainment >= 0.9] or points[:1]
    at = max(passing, key=lambda pt: pt.rate)
    s = summarize(at.results, 1.0)
    return {"goodput_rps": round(gp, 4), "ttft_p90_ms": round(p90(s, "ttft_ms"), 2),
            "tpot_p90_ms": round(p90(s, "tpot_ms"), 2), "at_rate": at.rate,
            "points": [{"rate": pt.rate, "attainment": round(pt.attainment, 3),
                        "predicted_attainment": round(predicted[pt.rate].attainment, 3),
                        "stages": st, "predicted_stages": predicted[pt.rate].stages | {"cpu": predicted[pt.rate].cpu_s}}
                       for pt, st in zip(points, stages)]}


def validate(args: argparse.Namespace, result: Any) -> None:
    specs = list(dict.fromkeys([p.topology for p in result.ranked[:args.validate_top]] + [result.colocated]))
    warmups = warmups_for(args)
    for spec in specs:
        pred = result.prediction(spec)
        rates = rates_for(args, pred.goodput_rps)
        predicted = {r: result.planner.simulate(spec, r) for r in rates}
        print(f"[validate] {spec}: rates {rates} (predicted goodput {pred.goodput_rps:.2f} req/s)", flush=True)
        try:
            points, stages = measure(args, spec, rates, warmups)
        except Exception as exc:  # a launch that failed: record it, go on with the others
            result.measured[spec] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        result.measured[spec] = measured_entry(points, stages, predicted)
    print_side_by_side(result)


def error_pct(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100.0 if measured > 0 else math.inf


def print_side_by_side(result: Any) -> None:
    print(f"\n{'topology':<12}{'rate':>7}{'attainment: predicted':>23}{'measured':>10}")
    for spec, m in result.measured.items():
        for pt in m.get("points", ()):
            print(f"{spec:<12}{pt['rate']:>7g}{pt['predicted_attainment']:>23.2f}{pt['attainment']:>10.2f}")
    print(f"\n{'topology':<12}{'goodput: predicted':>20}{'measured':>10}{'error':>8}")
    for spec, m in result.measured.items():
        if "error" in m:
            print(f"{spec:<12} failed: {m['error']}")
            continue
        pred = result.prediction(spec).goodput_rps
        print(f"{spec:<12}{pred:>20.2f}{m['goodput_rps']:>10.2f}{error_pct(pred, m['goodput_rps']):>7.0f}%")
    print_stages(result)
    ok = {s: m["goodput_rps"] for s, m in result.measured.items() if "goodput_rps" in m}
    if ok:
        best = max(ok, key=ok.get)
        rec = result.recommended.topology
        share = ok.get(rec, 0.0) / ok[best] if ok[best] else 0.0
        print(f"best measured: {best} ({ok[best]:.2f} req/s); recommended {rec} measured "
              f"{ok.get(rec, float('nan')):.2f} req/s = {share:.0%} of the best")


def print_stages(result: Any) -> None:
    """Per instance and stage, forward passes and their seconds, and per process its CPU seconds, predicted and
    measured at the rate where TTFT and TPOT are reported: which stage or process costs more than the model says."""
    print(f"\n{'topology':<12}{'rate':>6}  {'process':<8}{'stage':<9}{'passes: predicted':>18}{'measured':>9}"
          f"{'seconds: predicted':>20}{'measured':>9}")
    for spec, m in result.measured.items():
        pt = next((p for p in m.get("points", ()) if p["rate"] == m.get("at_rate")), None)
        if pt is None:
            continue
        pred, meas = pt["predicted_stages"], pt["stages"]
        for inst in sorted((set(pred) | set(meas)) - {"cpu"}):
            for stage in sorted(set(pred.get(inst, {})) | set(meas.get(inst, {}))):
                pp, ps = pred.get(inst, {}).get(stage, (0, 0.0))
                mp, ms = meas.get(inst, {}).get(stage, (0, 0.0))
                print(f"{spec:<12}{pt['rate']:>6g}  {inst:<8}{stage:<9}{pp:>18}{mp:>9}{ps:>20.2f}{ms:>9.2f}")
        for proc in sorted(set(pred.get("cpu", {})) | set(meas.get("cpu", {}))):
            ps, ms = pred.get("cpu", {}).get(proc, 0.0), meas.get("cpu", {}).get(proc, float("nan"))
            print(f"{spec:<12}{pt['rate']:>6g}  {proc:<8}{'CPU':<9}{'':>18}{'':>9}{ps:>20.2f}{ms:>9.2f}")

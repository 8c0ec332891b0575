"""`epd bench`: run a workload against an endpoint (or self-launched topologies), or compare results.

    epd bench --base-url URL --dataset textcaps --num-prompts 200 --request-rate 4 --save-result
    epd bench --launch EPD --launch "E,PD" --dataset fixed --sweep-rates 1,2,4,8 --save-result
    epd bench compare A.json B.json [--plot attainment.png]

Option names follow `vllm bench serve` where they overlap.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serving.workloads import DATASETS
from runtime.config import Slo


@dataclass(frozen=True)
class RunPoint:
    rate: float
    attainment: float
    results: tuple
    file: str | None
    client_cpu_s: float = 0.0  # the client's CPU over the timed run (not building the requests)


def add_bench_parser(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible endpoint (or compare results)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("action", nargs="?", choices=("run", "compare"), default="run")
    p.add_argument("files", nargs="*", help="compare: result JSON files (the first is the baseline)")
    p.add_argument("--plot", default=None, help="compare: write an attainment-vs-rate PNG of the sweep files")
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:30000")
    t.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    t.add_argument("--api-key", default=None)
    t.add_argument("--label", default=None, help="system name in results and plots (default: URL or topology)")
    t.add_argument("--launch", "--launch-topology", dest="launch", action="append", default=[], metavar="SPEC",
                   help="start `epd serve` with this topology on a free port, bench it, stop it (repeatable)")
    t.add_argument("--launch-model", default=None,
                   help="model `--launch` serves (default: the trained 'shapes' for --dataset shapes, "
                        "else 'tiny-random')")
    t.add_argument("--launch-args", default="", help="extra `epd serve` flags, one shell-quoted string")
    t.add_argument("--launch-timeout", type=float, default=300.0)
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=DATASETS, default="fixed")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--image-size", type=int, default=224, help="fixed: square image side")
    w.add_argument("--input-len", type=int, default=16, help="fixed: text words in the prompt")
    w.add_argument("--output-len", type=int, default=None, help="max_tokens of every request (fixed: 32)")
    w.add_argument("--ignore-eos", action="store_true", help="generate exactly the requested output length")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--num-warmups", type=int, default=1, help="untimed requests (distinct images) first")
    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    a.add_argument("--max-concurrency", type=int, default=None)
    a.add_argument("--sweep-rates", default=None, help="comma-separated rates; reports goodput")
    a.add_argument("--request-timeout", type=float, default=600.0)
    Slo.add_arguments(a)
    o = p.add_argument_group("output")
    o.add_argument("--save-result", action="store_true", help="write JSON (one file per run) and PNG plots")
    o.add_argument("--result-dir", default=".")
    o.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(handler=bench)


def bench(args: argparse.Namespace) -> int:
    if args.action == "compare":
        return compare(args)
    from benchmarks.serving.workloads import WorkloadConfig, build_workload

    rates = parse_rates(args.sweep_rates) if args.sweep_rates else [args.request_rate]
    wcfg = WorkloadConfig(args.dataset, args.num_prompts, args.seed, args.output_len, args.input_len,
                          args.image_size)
    requests = build_workload(wcfg)
    warmups = build_workload(WorkloadConfig(**{**wcfg.__dict__, "seed": args.seed + 7919,
                                               "num_prompts": args.num_warmups})) if args.num_warmups else []
    sweeps: dict[str, list[tuple[float, float]]] = {}
    cdfs: dict[str, tuple] = {}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with closing(systems(args)) as targets:  # closing: a launched server stops even on errors
        for label, url in targets:
            points = run_system(args, label, url, requests, warmups, rates, stamp)
            sweeps[label] = [(pt.rate, pt.attainment) for pt in points]
            cdfs.update({f"{label}@{pt.rate:g}": pt.results for pt in points})
    if args.save_result:
        write_plots(args, sweeps, cdfs, stamp)
    return 0


def parse_rates(text: str) -> list[float]:
    rates = sorted(float(x) for x in text.split(",") if x.strip())
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise SystemExit(f"--sweep-rates {text!r}: need finite positive rates")
    return rates


def systems(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(label, base URL) for each system: the launched topologies, else --base-url."""
    if not args.launch:
        yield args.label or args.base_url, args.base_url
        return
    from benchmarks.serving.launch import launched

    for spec in args.launch:
        model = args.launch_model or ("shapes" if args.dataset == "shapes" else "tiny-random")
        with launched(spec, model, shlex.split(args.launch_args), Path(args.result_dir),
                      args.launch_timeout) as url:
            yield (f"{args.label} {spec}" if args.label else spec), url


def resolve_model(args: argparse.Namespace, url: str) -> str:
    if args.model:
        return args.model
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def run_system(args: argparse.Namespace, label: str, url: str, requests: list, warmups: list,
               rates: list[float], stamp: str) -> list[RunPoint]:
    from benchmarks.serving import report
    from benchmarks.serving.accuracy import accuracy, accuracy_table
    from benchmarks.serving.arrivals import arrival_times
    from benchmarks.serving.client import Target, run_benchmark
    from benchmarks.serving.metrics import goodput, summarize

    target = Target(url, resolve_model(args, url), args.api_key, args.ignore_eos, args.request_timeout)
    slo = Slo.from_args(args)
    print(f"[{label}] {url} model={target.model} dataset={args.dataset} n={len(requests)} SLO: "
          f"TTFT <= {slo.ttft_ms:g} ms, p90 TPOT <= {slo.tpot_ms:g} ms")
    if warmups:
        run_benchmark(target, warmups, [0.0] * len(warmups), args.max_concurrency, progress=False)
    points = []
    for rate in rates:
        arrivals = arrival_times(len(requests), rate, args.burstiness, args.seed)
        out = run_benchmark(target, requests, arrivals, args.max_concurrency, not args.disable_tqdm)
        s = summarize(out.results, out.duration_s, slo)
        print(report.summary_table(f"{label} @ {rate:g} req/s", s, out.client_cpu_s))
        acc = accuracy(requests, out.results)
        if acc:
            print(accuracy_table(acc))
        errors = {r.error for r in out.results if not r.success}
        if errors:
            print(f"errors ({len(errors)} distinct): {sorted(errors)[:3]}")
        path = None
        if args.save_result:
            payload = report.run_payload(label, config_dict(args, target.model), rate, s, out.results,
                                         out.client_cpu_s) | ({"accuracy": acc} if acc else {})
            path = str(report.write_json(result_path(args, label, f"r{rate:g}", stamp, "json"), payload))
            print(f"saved {path}")
        points.append(RunPoint(rate, s.slo_attainment or 0.0, out.results, path, out.client_cpu_s))
    if args.sweep_rates:
        gp = goodput([(pt.rate, pt.attainment) for pt in points])
        print(f"[{label}] goodput (attainment >= 90%): {gp:.3f} req/s")
        if args.save_result:
            pts = [{"rate": pt.rate, "attainment": pt.attainment, "file": pt.file} for pt in points]
            path = report.write_json(result_path(args, label, "sweep", stamp, "json"),
                                     report.sweep_payload(label, config_dict(args, target.model), slo, pts, gp))
            print(f"saved {path}")
    return points


def config_dict(args: argparse.Namespace, model: str) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("handler", "files", "plot", "action")}
    return cfg | {"model": model}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "run"


def result_path(args: argparse.Namespace, label: str, tag: str, stamp: str, ext: str) -> Path:
    return Path(args.result_dir) / f"{slug(label)}-{args.dataset}-{tag}-{stamp}.{ext}"


def write_plots(args: argparse.Namespace, sweeps: dict, cdfs: dict, stamp: str) -> None:
    from benchmarks.serving import report

    base = Path(args.result_dir) / f"bench-{args.dataset}-{stamp}"
    print(f"saved {report.plot_cdfs(cdfs, base.with_name(base.name + '-cdf.png'))}")
    if args.sweep_rates:
        slo = Slo.from_args(args)
        print(f"saved {report.plot_attainment(sweeps, slo, base.with_name(base.name + '-attainment.png'))}")


def compare(args: argparse.Namespace) -> int:
    from benchmarks.serving import report

    if len(args.files) < 1:
        raise SystemExit("epd bench compare: give one or more result JSON files")
    print(report.compare_table([Path(f) for f in args.files]))
    if args.plot:
        sweeps = report.sweep_points([Path(f) for f in args.files])
        if sweeps:
            print(f"saved {report.plot_attainment(sweeps, None, Path(args.plot))}")
    return 0

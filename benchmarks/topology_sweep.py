"""Topology sweep: every E/P/D topology that fits this machine under encode-heavy, decode-heavy and mixed load.

    .venv/bin/python -m benchmarks.topology_sweep [--quick] [--out results/topology_sweep]

Each topology runs as `epd serve MODEL --instances SPEC` on a free 127.0.0.1 port and is stopped
before the next starts. Each workload is sent closed-loop (all requests queued at t=0, at most
`max_concurrency` in flight) after a few untimed warm-up requests. Prints a table and the best
split topology against the colocated EPD per workload; writes JSON, a bar chart and TTFT/TPOT CDFs.
Bounded: a launch, a workload cell and the whole sweep each have a deadline.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/topology_sweep.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import report, topology_report
from benchmarks.serving.arrivals import arrival_times
from benchmarks.serving.cli import resolve_model
from benchmarks.serving.client import RunOutput, Target, run_benchmark
from benchmarks.serving.launch import launched
from benchmarks.serving.metrics import RequestResult, summarize
from benchmarks.serving.role_workloads import WORKLOADS, build_role_workload
from benchmarks.serving.workloads import BenchRequest
from runtime.cluster.server_process import REPO_ROOT

TOPOLOGIES = ("EPD", "E,PD", "EP,D", "ED,P", "E,P,D", "2E,P,D")
COLOCATED = "EPD"
WARMUP_SEED_OFFSET = 7919
BUSY_WARNING = 0.25


@dataclass(frozen=True)
class Load:
    num_prompts: int
    max_concurrency: int


# Sized for a 2-core CPU with the tiny model: the full sweep takes ~10-15 min, --quick ~2 min.
FULL = {"encode-heavy": Load(56, 8), "decode-heavy": Load(256, 32), "mixed": Load(112, 16)}
QUICK = {"encode-heavy": Load(4, 4), "decode-heavy": Load(12, 12), "mixed": Load(8, 8)}


@dataclass
class Cell:
    topology: str
    workload: str
    load: Load
    status: str = "pending"  # then ok | errors (some requests failed) | timeout | error | skipped
    errors: list[str] = field(default_factory=list)
    summary: dict | None = None
    results: tuple[RequestResult, ...] = ()
    wall_s: float = 0.0
    cpu_busy_before: float | None = None  # CPU share used by others just before the launch

    def as_dict(self) -> dict:
        return {"topology": self.topology, "workload": self.workload, **asdict(self.load),
                "status": self.status, "errors": self.errors, "wall_s": self.wall_s,
                "cpu_busy_before": self.cpu_busy_before, **(self.summary or {})}


class CellTimeout(Exception):
    def __init__(self, worker: threading.Thread) -> None:
        super().__init__("workload ran past its deadline")
        self.worker = worker


class Worker(threading.Thread):
    """Runs `fn` on a daemon thread so that the caller can give up waiting at a deadline."""

    def __init__(self, fn: Callable[[], RunOutput]) -> None:
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the waiting thread
            self.error = e


def measure(target: Target, warmups: list[BenchRequest], requests: list[BenchRequest],
            arrivals: list[float], max_concurrency: int) -> RunOutput:
    if warmups:
        run_benchmark(target, warmups, [0.0] * len(warmups), len(warmups), progress=False)
    return run_benchmark(target, requests, arrivals, max_concurrency, progress=False)


def run_cell(args: argparse.Namespace, target: Target, cell: Cell) -> None:
    """One workload against the running server; raises CellTimeout when it outlives `--cell-timeout`."""
    warmups = build_role_workload(cell.workload, args.warmups, args.seed + WARMUP_SEED_OFFSET)
    requests = build_role_workload(cell.workload, cell.load.num_prompts, args.seed)
    arrivals = arrival_times(len(requests), args.request_rate, 1.0, args.seed)
    t0 = time.monotonic()
    worker = Worker(lambda: measure(target, warmups, requests, arrivals, cell.load.max_concurrency))
    worker.start()
    worker.join(args.cell_timeout)
    cell.wall_s = time.monotonic() - t0
    if worker.is_alive():
        cell.status, cell.errors = "timeout", [f"not done after {args.cell_timeout:g}s"]
        raise CellTimeout(worker)
    if worker.error is not None:
        raise worker.error
    out = worker.value
    cell.results = out.results
    cell.summary = asdict(summarize(out.results, out.duration_s))
    cell.errors = sorted({r.error for r in out.results if not r.success})[:3]
    cell.status = "errors" if cell.errors else "ok"


def cpu_times() -> tuple[int, int]:
    """(total, idle + iowait) jiffies over all CPUs, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]


def cpu_busy(window_s: float = 1.0) -> float | None:
    """Share of all CPUs busy over `window_s` (None where /proc/stat is missing).

    Sampled before each launch, when nothing of this sweep runs: anything well above 0 is another
    program on the machine, and the numbers of that topology are then suspect.
    """
    try:
        total0, idle0 = cpu_times()
        time.sleep(window_s)
        total1, idle1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def serve_args(args: argparse.Namespace) -> list[str]:
    threads = ["--num-threads", str(args.num_threads)] if args.num_threads else []
    return threads + shlex.split(args.serve_args)


def sweep_topology(args: argparse.Namespace, spec: str, deadline: float) -> list[Cell]:
    """Start `spec`, run every workload against it, stop it; failures are recorded in the cells."""
    cells = [Cell(spec, w, args.loads[w]) for w in args.workloads]
    if time.monotonic() >= deadline:
        return mark(cells, "skipped", "sweep time budget spent")
    busy = cpu_busy()
    for cell in cells:
        cell.cpu_busy_before = busy
    if busy is not None and busy > BUSY_WARNING:
        print(f"[{spec}] warning: {busy:.0%} of the CPUs busy before launch (another program?)", flush=True)
    t0 = time.monotonic()
    try:
        with launched(spec, args.model, serve_args(args), args.out / "logs", args.launch_timeout) as url:
            print(f"[{spec}] serving at {url} (up in {time.monotonic() - t0:.1f}s)", flush=True)
            run_workloads(args, url, cells, deadline)
    except CellTimeout as e:
        e.worker.join(30.0)  # the server is gone, so its requests fail fast
        mark(cells, "skipped", "an earlier workload on this topology timed out")
    except Exception as e:  # a launch that failed, or a client error: record it and go on
        mark(cells, "error", f"{type(e).__name__}: {e}"[:300])
    print(f"[{spec}] stopped ({time.monotonic() - t0:.1f}s in all)", flush=True)
    return cells


def run_workloads(args: argparse.Namespace, url: str, cells: list[Cell], deadline: float) -> None:
    model = resolve_model(argparse.Namespace(model=None, api_key=None), url)
    target = Target(url, model, ignore_eos=True, request_timeout_s=args.cell_timeout)
    for cell in cells:
        if time.monotonic() >= deadline:
            mark(cells, "skipped", "sweep time budget spent")
            return
        run_cell(args, target, cell)
        print(f"[{cell.topology}] {cell.workload}: {cell.status} in {cell.wall_s:.1f}s", flush=True)


def mark(cells: list[Cell], status: str, why: str) -> list[Cell]:
    """Give every cell that has not run yet `status`, with the reason."""
    for cell in cells:
        if cell.status == "pending":
            cell.status, cell.errors = status, [why]
    return cells


def write_outputs(args: argparse.Namespace, cells: list[Cell], ratios: dict, wall_s: float) -> None:
    name = "sweep-quick" if args.quick else "sweep"
    config = {k: v for k, v in vars(args).items() if k not in ("out", "loads")} | {"out": str(args.out)}
    payload = {"kind": "topology_sweep", "config": config | {"loads": {k: asdict(v) for k, v in args.loads.items()}},
               "wall_s": wall_s, "cells": [c.as_dict() for c in cells], "best_vs_colocated": ratios}
    print(f"saved {report.write_json(args.out / f'{name}.json', payload)}")
    rows = [c.as_dict() for c in cells]
    print(f"saved {topology_report.plot(rows, args.out / f'{name}.png', f'{args.model}, {wall_s:.0f}s sweep')}")
    for w in args.workloads:
        runs = {c.topology: c.results for c in cells if c.workload == w and c.results}
        if runs:
            print(f"saved {report.plot_cdfs(runs, args.out / f'{name}-cdf-{w}.png')}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (few requests per cell)")
    p.add_argument("--model", default="tiny-random", help="`epd serve` model: a directory, or 'tiny-random'")
    p.add_argument("--topologies", default=";".join(TOPOLOGIES),
                   type=lambda s: [t.strip() for t in s.split(";") if t.strip()],
                   help="';'-separated specs (commas belong to a spec)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), type=lambda s: s.split(","))
    p.add_argument("--num-prompts", type=int, default=None, help="requests per cell; unset: per workload")
    p.add_argument("--max-concurrency", type=int, default=None, help="in flight per cell; unset: per workload")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="req/s; inf = closed loop")
    p.add_argument("--warmups", type=int, default=None, help="untimed requests before each cell; unset: 2 (quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None, help="torch threads in all; unset: all CPUs")
    p.add_argument("--serve-args", default="", help="extra `epd serve` flags, one shell-quoted string")
    p.add_argument("--launch-timeout", type=float, default=300.0)
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per topology x workload")
    p.add_argument("--time-budget", type=float, default=1800.0, help="seconds; later cells are skipped")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "topology_sweep")
    return finish(p, p.parse_args(argv))


def finish(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        p.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    if not args.topologies:
        p.error("--topologies: give at least one spec")
    base = QUICK if args.quick else FULL
    args.warmups = (1 if args.quick else 2) if args.warmups is None else args.warmups
    args.loads = {w: Load(args.num_prompts or base[w].num_prompts, args.max_concurrency or base[w].max_concurrency)
                  for w in args.workloads}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that launched servers stop
    from runtime.tiny_model import resolve_model as checkpoint_dir

    print(f"model: {checkpoint_dir(args.model)}")
    t0 = time.monotonic()
    deadline = t0 + args.time_budget
    cells = [cell for spec in args.topologies for cell in sweep_topology(args, spec, deadline)]
    wall_s = time.monotonic() - t0
    rows = [c.as_dict() for c in cells]
    ratios = topology_report.best_vs_colocated(rows, COLOCATED)
    print()
    print(topology_report.table(rows))
    print()
    print(topology_report.ratio_lines(ratios))
    busy = sorted({c.topology for c in cells if (c.cpu_busy_before or 0.0) > BUSY_WARNING})
    if busy:
        print(f"warning: another program used the CPUs before {', '.join(busy)}: those numbers are suspect")
    print(f"total wall time: {wall_s:.0f}s ({len(args.topologies)} topologies x {len(args.workloads)} workloads)")
    write_outputs(args, cells, ratios, wall_s)
    return 0 if all(c.status == "ok" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Candidate topologies for the resources, and goodput by simulation: the highest request rate at which at
least 90% of requests meet the SLO (the same definition, and with a rate list the same interpolation, as
`epd bench --sweep-rates`)."""
from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.cluster.topology import parse_topology
from runtime.config import Slo
from runtime.planner.sim import Budgets, Costs, Outcome, Simulation
from runtime.planner.workload import Shape, schedule

log = logging.getLogger(__name__)
GOODPUT_ATTAINMENT = 0.9
Setup = Callable[[Simulation], None]
PARTITIONS = (("EPD",), ("E", "PD"), ("EP", "D"), ("ED", "P"), ("E", "P", "D"))
BISECTIONS = 6
MIN_RATE = 1 / 64
ITEM = re.compile(r"(\d+)?([EPDepd]+)")


@dataclass(frozen=True)
class Resources:
    cores: int | None = None  # a CPU host: instances share these cores (threads split as `epd serve` does)
    gpus: int | None = None  # one accelerator per instance; nothing is shared
    threads_per_instance: int | None = None  # None: the cores split evenly, as `epd serve` does

    def nodes(self, spec: str) -> list[tuple[str, frozenset[str], int]]:
        if self.gpus:
            return gpu_nodes(spec)
        topo = parse_topology(spec, self.cores)
        return [(i.name, i.roles, 1 if self.gpus else (self.threads_per_instance or i.threads or 1))
                for i in topo.instances]


@dataclass(frozen=True)
class Prediction:
    topology: str
    goodput_rps: float
    ttft_p90_ms: float
    tpot_p90_ms: float
    points: tuple[tuple[float, float], ...]  # (rate, attainment) simulated

    def as_dict(self) -> dict:
        """JSON-safe: an unbounded goodput (a burst meets the SLO) is null, with `unbounded` true."""
        gp = None if math.isinf(self.goodput_rps) else round(self.goodput_rps, 4)
        return {"goodput_rps": gp, "unbounded": gp is None, "ttft_p90_ms": round(self.ttft_p90_ms, 2),
                "tpot_p90_ms": round(self.tpot_p90_ms, 2)}


def gpu_nodes(spec: str) -> list[tuple[str, frozenset[str], int]]:
    """`[N]ROLES,...` as for `epd serve`, without its 16-instance cap (a cluster plan may have 64)."""
    nodes = []
    for item in spec.split(","):
        m = ITEM.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"bad topology item {item!r}")
        roles = frozenset(m[2].upper())
        for _ in range(int(m[1] or 1)):
            nodes.append((f"{''.join(r for r in 'EPD' if r in roles)}{len(nodes)}", roles, 1))
    return nodes


def spec_of(groups: Sequence[str], counts: Sequence[int]) -> str:
    return ",".join(f"{n}{g}" if n > 1 else g for g, n in zip(groups, counts))


def cpu_candidates(max_instances: int) -> list[str]:
    """Each partition of {E, P, D} into instance kinds, each kind replicated, at most `max_instances` in all."""
    out = []
    for groups in PARTITIONS:
        for counts in itertools.product(range(1, max_instances + 1), repeat=len(groups)):
            if sum(counts) <= max_instances:
                out.append(spec_of(groups, counts))
    return out


def gpu_candidates(gpus: int, unit: int = 1) -> list[str]:
    """Each partition replicated to use exactly `gpus` instances (one GPU each), counts in steps of `unit`."""
    out = []
    for groups in PARTITIONS:
        k = len(groups)
        steps = [c for c in range(unit, gpus + 1, unit)]
        for counts in itertools.product(steps, repeat=k - 1):
            last = gpus - sum(counts)
            if last >= 1:
                out.append(spec_of(groups, (*counts, last)))
    return out


def goodput(points: Sequence[tuple[float, float]], threshold: float = GOODPUT_ATTAINMENT) -> float:
    """As benchmarks/serving/metrics.goodput: walk rates up to the first failing one, interpolate."""
    last = None
    for rate, att in sorted(points):
        if att >= threshold:
            last = (rate, att)
            continue
        if last is None:
            return 0.0
        return last[0] + (last[1] - threshold) / (last[1] - att) * (rate - last[0])
    return last[0] if last else 0.0


class Planner:
    def __init__(self, shapes: Sequence[Shape], costs: Costs, slo: Slo, resources: Resources,
                 budgets: Budgets | None = None, burstiness: float = 1.0, seed: int = 0,
                 max_concurrency: int | None = None) -> None:
        self.shapes, self.costs, self.slo, self.resources = list(shapes), costs, slo, resources
        self.budgets, self.burstiness = budgets or Budgets(), burstiness
        self.seed, self.cap = seed, max_concurrency

    def simulate(self, spec: str, rate: float, setup: Setup | None = None) -> Outcome:
        sim = Simulation(self.resources.nodes(spec), self.costs, self.budgets,
                         None if self.resources.gpus else self.resources.cores, self.cap)
        if setup is not None:
            setup(sim)
        return sim.run(schedule(self.shapes, rate, self.burstiness, self.seed), self.slo)

    def predict(self, spec: str, rates: Sequence[float] | None = None, setup: Setup | None = None) -> Prediction:
        """Goodput of `spec` (at `rates`, or by search); `setup` is applied to every simulation (role switching)."""
        if rates:
            points = [(r, self.simulate(spec, r, setup).attainment) for r in rates]
        else:
            points = self._search(spec, setup)
        gp = goodput(points)
        at = self.simulate(spec, gp if gp > 0 else min(r for r, _ in points), setup)
        if not math.isinf(gp) and gp > 2 * capacity_bound(spec, self):
            log.warning("%s: predicted goodput %.1f req/s is over twice the capacity bound: %d requests end before "
                        "a steady state (give more requests or a tighter SLO)", spec, gp, len(self.shapes))
        if math.isinf(gp):
            log.warning("%s: a burst of all %d requests meets the SLO; goodput is unbounded for this workload "
                        "(give more requests or a tighter SLO)", spec, len(self.shapes))
        return Prediction(spec, gp, at.p90(at.ttft_ms), at.p90(at.tpot_ms), tuple(sorted(points)))

    def _search(self, spec: str, setup: Setup | None = None) -> list[tuple[float, float]]:
        """From half the capacity bound, double (or halve) the rate until attainment crosses 90%, then bisect."""
        burst = self.simulate(spec, math.inf, setup).attainment
        if burst >= GOODPUT_ATTAINMENT:  # all requests at once still meet the SLO: no knee to find
            return [(math.inf, burst)]
        rate = max(MIN_RATE, capacity_bound(spec, self) / 2)
        points = [(rate, self.simulate(spec, rate, setup).attainment)]
        up = points[0][1] >= GOODPUT_ATTAINMENT
        for _ in range(16):
            if (points[-1][1] >= GOODPUT_ATTAINMENT) != up or (not up and rate <= MIN_RATE):
                break
            rate = rate * 2 if up else rate / 2
            points.append((rate, self.simulate(spec, rate, setup).attainment))
        passing = [r for r, a in points if a >= GOODPUT_ATTAINMENT]
        failing = [r for r, a in points if a < GOODPUT_ATTAINMENT]
        if not passing or not failing:
            return points
        lo, hi = max(passing), min(r for r in failing if r > max(passing))
        for _ in range(BISECTIONS):
            mid = (lo + hi) / 2
            att = self.simulate(spec, mid, setup).attainment
            points.append((mid, att))
            lo, hi = (mid, hi) if att >= GOODPUT_ATTAINMENT else (lo, mid)
        return points

    def rank(self, specs: Sequence[str], rates: Sequence[float] | None = None, keep: int | None = None,
             always: Sequence[str] = ()) -> list[Prediction]:
        """Simulate each spec (or only the `keep` with the highest capacity bound, plus `always`), best first."""
        if keep is not None and len(specs) > keep:
            by_bound = sorted(specs, key=lambda s: -capacity_bound(s, self))
            specs = list(dict.fromkeys([*by_bound[:keep], *always]))
        preds = [self.predict(s, rates) for s in specs]
        return sorted(preds, key=lambda p: (-p.goodput_rps, p.ttft_p90_ms))


def stage_ms(planner: Planner, threads: int) -> dict[str, float]:
    """Mean instance time one request costs each stage under full batches (ms at full speed)."""
    c, b, slo = planner.costs, planner.budgets, planner.slo
    shapes = planner.shapes
    prompt = sum(s.prompt_len for s in shapes) / len(shapes)
    out = sum(s.output_len for s in shapes) / len(shapes)
    batch = max([k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= b.max_running
                 and c.decode_ms(k, prompt + out / 2, threads) <= slo.tpot_ms] or [1])
    per_token = c.prefill_ms(b.prefill_token_budget, threads) / b.prefill_token_budget
    return {"E": sum(c.encode_ms(s.image_tokens, threads) for s in shapes if s.image_tokens) / len(shapes),
            "P": per_token * prompt,
            "D": max(0.0, out - 1) * c.decode_ms(batch, prompt + out / 2, threads) / batch}


def capacity_bound(spec: str, planner: Planner) -> float:
    """A fluid upper bound on throughput (req/s): each kind of instance's share of the work, no queueing."""
    load: dict[frozenset[str], list] = {}
    for _, roles, threads in planner.resources.nodes(spec):
        load.setdefault(roles, [0, threads])[0] += 1
    shares = {r: sum(n for roles, (n, _) in load.items() if r in roles) for r in "EPD"}
    worst = float("inf")
    for roles, (count, threads) in load.items():
        ms = stage_ms(planner, threads)
        per_request = sum(ms[r] * count / shares[r] for r in roles)  # this kind's part of each stage
        worst = min(worst, count * 1000.0 / per_request if per_request > 0 else float("inf"))
    cores = planner.resources.cores
    if cores and not planner.resources.gpus:
        total = sum(stage_ms(planner, 1).values())
        worst = min(worst, cores * 1000.0 / total if total > 0 else worst)
    return worst if worst != float("inf") else 1000.0

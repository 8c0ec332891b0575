"""Role switching in the simulator: the rule `epd serve --role-switching` follows, tried on shifting workloads.

Every `check_s` the controller looks at the requests that arrived in the last `window_s` and asks the
planner's fluid model (search.capacity_bound) which single move -- one instance to another role set --
raises the bound most. A move that wins by `margin` on `sustain` checks in a row is made: the
instance stops taking new work, finishes what it holds, and then serves its new roles. One move at a
time, and never the last instance of a role.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.cluster.role_switch import SwitchPolicy, role_str
from runtime.cluster.topology import Topology
from runtime.config import CPU_HOST, Slo
from runtime.messages import GenerateRequest
from runtime.planner.search import Planner, Resources, capacity_bound, spec_of
from runtime.planner.sim import Budgets, Node, Simulation
from runtime.planner.workload import Shape

log = logging.getLogger(__name__)
SIM_POLICY = SwitchPolicy(window_s=4.0)  # the shifting-workload benchmark's window


def spec_for(roles: list[frozenset[str]]) -> str:
    counts = Counter(map(role_str, roles))
    return spec_of(list(counts), list(counts.values()))


def best_move(planner: Planner, roles: list[frozenset[str]], recent: list[Shape],
              policy: SwitchPolicy) -> tuple[int, frozenset[str], float] | None:
    """The single move (instance index, new roles) that raises the fluid capacity bound of `recent` most,
    with its gain, if it beats `1 + policy.margin`; never the last instance of a role.

    Instances with the same roles are interchangeable to the model, so each role set is tried once (on its
    first instance): the work per check grows with the number of role sets, not of instances."""
    probe = Planner(recent, planner.costs, planner.slo, planner.resources, planner.budgets)
    base = capacity_bound(spec_for(roles), probe)
    best, best_gain = None, 1.0 + policy.margin
    firsts: dict[frozenset[str], int] = {}
    for i, r in enumerate(roles):
        firsts.setdefault(r, i)
    for current, i in firsts.items():
        for new_roles in map(frozenset, policy.role_sets):
            new = roles[:i] + [new_roles] + roles[i + 1:]
            if new_roles == current or not all(any(r in s for s in new) for r in "EPD"):
                continue
            gain = capacity_bound(spec_for(new), probe) / base if base > 0 else float("inf")
            if gain > best_gain:
                best, best_gain = (i, new_roles, gain), gain
    return best


def shape_of(msg: GenerateRequest) -> Shape:
    """What the planner's model reads of a request: token counts and pixel bytes, never the pixels."""
    return Shape(tuple(im.num_tokens for im in msg.images), len(msg.input_ids), msg.sampling.max_new_tokens,
                 tuple(int(getattr(im.pixel_values, "nbytes", 0)) for im in msg.images), 0.0)


@dataclass
class PlannedMoves:
    """The router's `MoveChooser` under `epd serve --role-switching`: the planner's model on a profile."""

    planner: Planner  # its costs, SLO, resources and budgets; its shapes are unused

    def shape(self, msg: GenerateRequest) -> Shape:
        return shape_of(msg)

    def best_move(self, roles: list[frozenset[str]], recent: list[Shape],
                  policy: SwitchPolicy) -> tuple[int, frozenset[str], str] | None:
        move = best_move(self.planner, roles, recent, policy)
        if move is None:
            return None
        i, new_roles, gain = move
        return i, new_roles, f"the planner's model: capacity x{gain:.2f} for the last {len(recent)} requests"


@dataclass
class Switcher:
    sim: Simulation
    planner: Planner
    policy: SwitchPolicy = SIM_POLICY
    log: list[tuple[float, str, str, str]] = field(default_factory=list)  # (ms, node, from, to)
    _streak: tuple[Any, int] = (None, 0)

    def install(self) -> None:
        self.sim.on_switch = self._switched
        self.sim.clock.after(self.policy.check_s * 1000.0, self._check)

    def _recent(self) -> list[Shape]:
        now = self.sim.clock.now
        shapes = self.planner.shapes
        lo = now - self.policy.window_s * 1000.0
        return [shapes[i] for i, f in enumerate(self.sim.flights) if lo <= f.spec.arrival <= now]

    def _check(self) -> None:
        last = max((f.spec.arrival for f in self.sim.flights), default=0.0)
        if self.sim.clock.now < last + self.policy.window_s * 1000.0:
            self.sim.clock.after(self.policy.check_s * 1000.0, self._check)
        recent = self._recent()
        if not recent or any(n.draining_to is not None for n in self.sim.nodes):
            return
        move = self._best_move(recent)
        same = move is not None and move == self._streak[0]
        self._streak = (move, self._streak[1] + 1 if same else 1)
        if move is not None and self._streak[1] >= self.policy.sustain:
            node, roles = move
            self.sim.request_switch(node, frozenset(roles))
            self._streak = (None, 0)

    def _best_move(self, recent: list[Shape]) -> tuple[Node, str] | None:
        nodes = self.sim.nodes
        move = best_move(self.planner, [n.roles for n in nodes], recent, self.policy)
        return None if move is None else (nodes[move[0]], role_str(move[1]))

    def _switched(self, node: Node, old: frozenset[str]) -> None:
        self.log.append((self.sim.clock.now, node.name, role_str(old), role_str(node.roles)))
        for other in self.sim.nodes:
            self.sim._poll_lm(other)
            self.sim._poll_encoder(other)


def move_chooser(model_dir: str | Path, topology: Topology, slo: Slo | None = None,
                 **engine_overrides: Any) -> PlannedMoves | None:
    """What a deployment's router moves instances by: under `role_switching`, `planned_moves` (logged either
    way); None without role switching, or without a profile (the router's queue rule)."""
    if not engine_overrides.get("role_switching"):
        return None
    chooser = planned_moves(model_dir, topology, slo, **engine_overrides)
    log.info("role switching follows %s", "the planner's model (cached profile)" if chooser else
             "the queue rule (no `epd plan` profile of this model on this machine)")
    return chooser


def planned_moves(model_dir: Path, topology: Topology, slo: Slo | None = None, **budgets: Any) -> PlannedMoves | None:
    """The planner's model for `epd serve --role-switching`, from the profile `epd plan` cached for this model
    on this machine (None without one: the router then follows its queue rule). Nothing is measured here."""
    from runtime.planner import profile
    from runtime.planner.cli import profile_cache_dir
    from runtime.planner.costs import ProfileCosts

    path = profile.cache_path(Path(model_dir), profile_cache_dir())
    data = profile.load_or_new(path, Path(model_dir))
    if not data[profile.THREADS_KEY]:
        return None
    threads = [i.threads for i in topology.instances]
    cores = os.cpu_count() or 1  # the instances share this host's cores (each has at least one thread)
    cores = min(cores, sum(threads)) if all(threads) else cores
    known = {f.name for f in dataclasses.fields(Budgets)}
    planner = Planner([], ProfileCosts(data), slo or Slo(), Resources(cores=cores),
                      Budgets(**{**CPU_HOST,  # a CPU host, as `epd serve` there
                                 **{k: v for k, v in budgets.items() if k in known and v is not None}}))
    return PlannedMoves(planner)

"""Role switching in the simulator: the rule `epd serve --role-switching` follows, tried on shifting workloads.

Every `check_ms` the controller looks at the requests that arrived in the last `window_ms` and asks the
planner's fluid model (search.capacity_bound) which single move -- one instance to another role set --
raises the bound most. A move that wins by `margin` on `sustain` checks in a row is made: the
instance stops taking new work, finishes what it holds, and then serves its new roles. One move at a
time, and never the last instance of a role.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runtime.planner.search import Planner, capacity_bound, spec_of
from runtime.planner.sim import Node, Simulation
from runtime.planner.workload import Shape

ROLE_SETS = ("E", "P", "D", "EP", "ED", "PD", "EPD")


@dataclass(frozen=True)
class SwitchPolicy:
    check_ms: float = 500.0
    window_ms: float = 4000.0
    sustain: int = 3
    margin: float = 0.15
    role_sets: tuple[str, ...] = ("E", "P", "D")  # what an instance may become


def spec_for(roles: list[frozenset[str]]) -> str:
    counts = Counter("".join(r for r in "EPD" if r in roles_) for roles_ in roles)
    return spec_of(list(counts), list(counts.values()))


@dataclass
class Switcher:
    sim: Simulation
    planner: Planner
    policy: SwitchPolicy = field(default_factory=SwitchPolicy)
    log: list[tuple[float, str, str, str]] = field(default_factory=list)  # (ms, node, from, to)
    _streak: tuple[Any, int] = (None, 0)

    def install(self) -> None:
        self.sim.on_switch = self._switched
        self.sim.clock.after(self.policy.check_ms, self._check)

    def _recent(self) -> list[Shape]:
        now = self.sim.clock.now
        shapes = self.planner.shapes
        lo = now - self.policy.window_ms
        return [shapes[i] for i, f in enumerate(self.sim.flights) if lo <= f.spec.arrival <= now]

    def _check(self) -> None:
        last = max((f.spec.arrival for f in self.sim.flights), default=0.0)
        if self.sim.clock.now < last + self.policy.window_ms:
            self.sim.clock.after(self.policy.check_ms, self._check)
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

    def _bound(self, roles: list[frozenset[str]], recent: list[Shape]) -> float:
        p = self.planner
        probe = Planner(recent, p.costs, p.slo, p.resources, p.budgets)
        return capacity_bound(spec_for(roles), probe)

    def _best_move(self, recent: list[Shape]) -> tuple[Node, str] | None:
        nodes = self.sim.nodes
        current = [n.roles for n in nodes]
        base = self._bound(current, recent)
        best, best_gain = None, 1.0 + self.policy.margin
        for i, node in enumerate(nodes):
            for roles in self.policy.role_sets:
                new = current[:i] + [frozenset(roles)] + current[i + 1:]
                if frozenset(roles) == node.roles or not all(any(r in s for s in new) for r in "EPD"):
                    continue
                gain = self._bound(new, recent) / base if base > 0 else float("inf")
                if gain > best_gain:
                    best, best_gain = (node, roles), gain
        return best

    def _switched(self, node: Node, old: frozenset[str]) -> None:
        fmt = lambda r: "".join(x for x in "EPD" if x in r)  # noqa: E731
        self.log.append((self.sim.clock.now, node.name, fmt(old), fmt(node.roles)))
        for other in self.sim.nodes:
            self.sim._poll_lm(other)
            self.sim._poll_encoder(other)

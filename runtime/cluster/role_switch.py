"""Role switching (`epd serve --role-switching`): move an instance to the stage that has been the bottleneck.

Every `check_s` the router samples each stage's pressure -- work queued per instance serving it:
- E: image encodes sent and not done;
- P: requests waiting for prefill (their embeddings, or a prefill slot);
- D: requests decoding, over `decode_batch` (the batch at which a decode step reaches the TPOT target),
  plus hand-offs waiting for a D.
When one stage's pressure stays >= `high` on every sample of a `window_s` window while another stage
stays <= `low` and has an instance that serves only it (and is not its last), that instance is moved:
it takes no new work, finishes what it holds, then the router tells it its new roles. Every instance
of such a deployment loaded the vision tower and the language model at start, so no weights load.
Switches are logged and counted (`role_switches`, `/metrics` epd_role_switches_total).

With a `MoveChooser` (the planner's model, `runtime.planner.switching.PlannedMoves`, when `epd plan` has
profiled this model on this machine) the queue rule gives way: every check, the chooser is asked which
single move raises the capacity of the requests that arrived in the last window by `margin`, and a move
named on `sustain` checks in a row is made. The planner's simulator follows the same policy.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from runtime.cluster import wire
from runtime.messages import GenerateRequest

log = logging.getLogger(__name__)
ROLES = "EPD"


@dataclass(frozen=True)
class SwitchPolicy:
    """When to move an instance: the router's and the planner simulator's one set of thresholds."""

    check_s: float = 0.5
    window_s: float = 10.0
    cooldown_s: float = 20.0  # after a switch, no other for this long
    high: float = 4.0  # queue rule: a stage this loaded per instance, on every sample of the window, ...
    low: float = 0.5  # ... while another stage is this idle
    decode_batch: int = 32
    sustain: int = 3  # planned moves: the same move named on this many checks in a row
    margin: float = 0.15  # planned moves: capacity must rise by this fraction
    role_sets: tuple[str, ...] = ("E", "P", "D")  # what an instance may become


class MoveChooser(Protocol):
    def shape(self, msg: GenerateRequest) -> Any:
        """What the chooser keeps of an arriving request (its sizes; never its pixels)."""
        ...

    def best_move(self, roles: list[frozenset[str]], recent: list[Any],
                  policy: SwitchPolicy) -> tuple[int, frozenset[str], str] | None:
        """The instance (an index into `roles`), its new roles and why, or None: keep the mix.

        `roles` holds every instance's current roles; `recent`, the shapes of the last window's requests."""
        ...


def role_str(roles: frozenset[str]) -> str:
    return "".join(r for r in ROLES if r in roles)


class RoleSwitcher:
    def __init__(self, router: Any, policy: SwitchPolicy | None = None, chooser: MoveChooser | None = None) -> None:
        self.router, self.policy, self.chooser = router, policy or SwitchPolicy(), chooser
        self.samples: deque[tuple[float, dict[str, float]]] = deque()
        self.arrivals: deque[tuple[float, Any]] = deque()  # (monotonic s, the chooser's shape of a request)
        self.streak: tuple[Any, int] = (None, 0)
        self.pending: dict[str, tuple[frozenset[str], bool]] = {}  # name -> (roles, told)
        self.last_check = self.last_switch = float("-inf")

    def note(self, msg: GenerateRequest) -> None:
        """A request arrived (the planner's model reads the window's requests)."""
        if self.chooser is not None:
            self.arrivals.append((time.monotonic(), self.chooser.shape(msg)))

    # ---- the rule -----------------------------------------------------------------------------------
    def pressures(self) -> dict[str, float]:
        r = self.router
        serving = {role: [v for v in r.views.values() if role in v.roles and v.draining_to is None]
                   for role in ROLES}
        encodes = sum(1 for task in r.encodes.values() if task.e is not None)
        queued = {"E": encodes, "P": sum(v.waiting for v in serving["P"] if "D" not in v.roles),
                  "D": sum(v.running for v in serving["D"]) / self.policy.decode_batch + len(r.pending_handoffs)}
        return {role: queued[role] / len(serving[role]) if serving[role] else 0.0 for role in ROLES}

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_check < self.policy.check_s:
            return
        self.last_check = now
        self._advance_pending()
        self.samples.append((now, self.pressures()))
        start = now - self.policy.window_s
        # keep the last sample at or before the window's start, so that the samples span the whole window
        # however late the router's loop ticks (a span short of it by one late tick never decided)
        while len(self.samples) > 1 and self.samples[1][0] <= start:
            self.samples.popleft()
        while self.arrivals and self.arrivals[0][0] < start:
            self.arrivals.popleft()
        if self.pending or now - self.last_switch < self.policy.cooldown_s:
            return
        move = self.decide() if self.chooser is None else self.planned()
        if move is not None:
            self.begin(*move)

    def decide(self) -> tuple[str, frozenset[str], str] | None:
        if not self.samples or self.samples[-1][0] - self.samples[0][0] < self.policy.window_s:
            return None
        hot = [role for role in ROLES if all(p[role] >= self.policy.high for _, p in self.samples)]
        cold = [role for role in ROLES if all(p[role] <= self.policy.low for _, p in self.samples)]
        if not hot or not cold:
            return None
        target = max(hot, key=lambda role: self.samples[-1][1][role])
        for donor in cold:
            views = [v for v in self.router.views.values() if donor in v.roles and v.draining_to is None]
            single = [v for v in views if v.roles == frozenset(donor)]
            if len(views) >= 2 and single:
                why = f"{target} queued {self.samples[-1][1][target]:.1f}/instance, {donor} idle"
                return min(single, key=lambda v: v.inflight).name, frozenset(target), why
        return None

    def planned(self) -> tuple[str, frozenset[str], str] | None:
        """The chooser's move, once it has named the same one on `sustain` checks in a row."""
        views = [v for v in self.router.views.values() if v.draining_to is None]
        recent = [shape for _, shape in self.arrivals]
        try:
            move = self.chooser.best_move([v.roles for v in views], recent, self.policy) if recent else None
        except Exception:  # a profile without this shape's costs, say: keep the mix, never stop the router
            log.exception("role switching: the planner's model failed; no move this check")
            move = None
        named = None if move is None else (views[move[0]].name, move[1], move[2])
        same = named is not None and self.streak[0] is not None and named[:2] == self.streak[0][:2]
        self.streak = (named, self.streak[1] + 1 if same else 1)
        if named is None or self.streak[1] < self.policy.sustain:
            return None
        self.streak = (None, 0)
        return named

    # ---- the move -----------------------------------------------------------------------------------
    def begin(self, name: str, roles: frozenset[str], why: str) -> None:
        view = self.router.views.get(name)
        if view is None or name in self.pending or view.roles == roles:
            return
        log.info("role switch: draining %s (%s -> %s): %s", name, role_str(view.roles), role_str(roles), why)
        view.draining_to = roles
        self.pending[name] = (roles, False)
        r = self.router
        r.sessions = {s: pd for s, pd in r.sessions.items() if name not in pd}
        self._advance_pending()

    def _drained(self, name: str) -> bool:
        r, view = self.router, self.router.views[name]
        busy = any(task.e == name for task in r.encodes.values()) or any(f.holder == name for f in r.flights.values())
        return not busy and view.inflight == 0 and view.encode_tokens == 0

    def _advance_pending(self) -> None:
        for name, (roles, told) in list(self.pending.items()):
            if name not in self.router.views:  # it died: it restarts with its original roles
                del self.pending[name]
            elif not told and self._drained(name):
                self._tell(name, roles)

    def _tell(self, name: str, roles: frozenset[str]) -> None:
        r = self.router
        r._next_call += 1
        future: Future = Future()
        r.controls[r._next_call] = (future, {name}, {})
        future.add_done_callback(lambda f: self._answered(name, roles, f.result().get(name, {})))
        self.pending[name] = (roles, True)
        r._send(name, wire.Control(r._next_call, f"set_roles:{role_str(roles)}"))

    def _answered(self, name: str, roles: frozenset[str], reply: dict) -> None:
        view = self.router.views.get(name)
        if view is None:
            self.pending.pop(name, None)
            return
        if "error" in reply:  # still busy inside (a late adoption, say): try again at the next check
            log.info("role switch of %s not yet: %s", name, reply["error"])
            self.pending[name] = (roles, False)
            return
        old = view.roles
        view.roles, view.draining_to = roles, None
        del self.pending[name]
        self.router.stats["role_switches"] += 1
        self.last_switch = time.monotonic()
        self.samples.clear()
        log.warning("role switch: %s now serves %s (was %s)", name, role_str(roles), role_str(old))

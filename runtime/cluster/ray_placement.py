"""A deployment's instances placed, started and watched by Ray (`epd serve ... --ray ADDRESS`).

Ray does only that: each instance is an actor in one placement group (the deployment starts whole or not
at all), asking for the CPUs, GPUs and custom resources of its topology entry; inside the actor runs the
very instance loop of `runtime.cluster.instance`. Control stays msgspec over our zmq sockets and tensors
move over shm or zmq frames (`NodeTransfer`); nothing of a request goes through Ray's object store.

Faults: an actor that dies (its process, or its node) fails its running `run` call; one that goes silent
(no load report for HEARTBEAT_S) is killed. Either way the router hears of it at once (`reap`), Ray
restarts the actor (`max_restarts`, on another node if its bundle moves), and `run` is called again until
the instance is back (its `Ready` puts it back in the router's views) or RESTART_WAIT_S have passed.
This module is imported only when Ray is asked for.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from runtime.cluster.instance import InstanceConfig
from runtime.cluster.topology import InstanceSpec, Topology
from runtime.cluster.transfer import sweep_segments

log = logging.getLogger(__name__)
MAX_RESTARTS = 5  # per actor, by Ray
HEARTBEAT_S = 4.0  # instances report their load at least once a second, between engine steps
RESTART_WAIT_S = 120.0
RESUBMIT_EVERY_S = 0.5
LOCAL_OBJECT_STORE_BYTES = 100 << 20  # we keep nothing in it


class RayCluster:
    """A connection to Ray: an existing cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`), or with `local` a
    private one on this machine, stopped by `close()`. A Ray session already open in this process (a test,
    a Ray job) is used as it is and left open."""

    def __init__(self, address: str, num_cpus: int | None = None) -> None:
        self.address, self.owned = address, not ray.is_initialized()
        if self.owned and address == "local":
            ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES)
        elif self.owned:
            ray.init(address=address)
        self.node_id = _driver_node_id()
        self.host = "127.0.0.1" if address == "local" else _node_ip(self.node_id)

    def close(self) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()


def _driver_node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id() or ""
    except Exception:  # a Ray Client driver is on no node: every instance counts as remote
        return ""


def _node_ip(node_id: str) -> str:
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


class InstanceActor:
    """One instance process, as Ray runs it. `run` returns when the instance is told to shut down."""

    def run(self, cfg_json: str) -> int:
        from runtime.cluster import instance

        node_id = ray.get_runtime_context().get_node_id()
        raw = json.loads(cfg_json) | {"node_id": node_id, "address": _node_ip(node_id)}
        return instance.main([json.dumps(raw)])

    def sweep(self, prefix: str) -> int:
        return len(sweep_segments(prefix))


def bundle(spec: InstanceSpec) -> dict[str, float]:
    """What one instance asks the cluster for: CPUs (default: its torch threads), GPUs, custom resources."""
    wants = {"CPU": spec.num_cpus if spec.num_cpus is not None else float(spec.threads or 1),
             "GPU": spec.num_gpus or 0, **dict(spec.resources)}
    return {k: float(v) for k, v in wants.items() if v} or {"CPU": 0.01}


def cpus_needed(topology: Topology) -> int:
    return int(sum(bundle(spec).get("CPU", 0) for spec in topology.instances) + 0.999)


class RayLauncher:
    """The `Launcher` interface (start_all, reap, stop, ...) over Ray actors in one placement group."""

    def __init__(self, topology: Topology, base: InstanceConfig, cluster: RayCluster,
                 placement_timeout_s: float = 60.0) -> None:
        self.specs = {spec.name: spec for spec in topology.instances}
        self.base, self.cluster, self.placement_timeout_s = base, cluster, placement_timeout_s
        self.ever_ready: set[str] = set()
        self.failed: dict[str, str] = {}
        self.stopping = False
        self.router: Any = None  # the RayRouter: its views say who serves, `silent` who went quiet
        self.actors: dict[str, Any] = {}
        self.runs: dict[str, Any] = {}  # name -> its running `run` call, None while it is being restarted
        self.errors: dict[str, str] = {}
        self._due: dict[str, float] = {}  # name -> when to call `run` again
        self._give_up_at: dict[str, float] = {}
        self.pg = None
        # An engine step longer than this (a huge prefill on CPU) would pass for a hang: raise it there.
        self.heartbeat_s = float(os.environ.get("EPD_RAY_HEARTBEAT_S", HEARTBEAT_S))

    def start_all(self) -> None:
        self.pg = self._place()
        actor_cls = ray.remote(InstanceActor)
        for index, (name, spec) in enumerate(self.specs.items()):
            wants = bundle(spec)
            self.actors[name] = actor_cls.options(
                num_cpus=wants.get("CPU", 0), num_gpus=wants.get("GPU", 0), max_restarts=MAX_RESTARTS,
                max_task_retries=0, name=f"{self.base.segment_prefix}-{name}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index),
            ).remote()
            self.start(name)

    def _place(self) -> Any:
        bundles = [bundle(spec) for spec in self.specs.values()]
        pg = placement_group(bundles, strategy="PACK", name=self.base.segment_prefix)
        try:
            ray.get(pg.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            asks = ", ".join(f"{name}: {b}" for name, b in zip(self.specs, bundles))
            raise RuntimeError(f"the Ray cluster cannot place this deployment within {self.placement_timeout_s:g}s "
                               f"(it asks {asks}; the cluster has {ray.cluster_resources()} in all, "
                               f"{ray.available_resources()} free)") from None
        return pg

    def start(self, name: str) -> None:
        spec = self.specs[name]
        cfg = dataclasses.replace(self.base, name=name, roles=spec.role_str, threads=spec.threads, cores=spec.cores)
        self.runs[name] = self.actors[name].run.remote(json.dumps(dataclasses.asdict(cfg)))

    # ---- watching -----------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Names of instances that were serving and died since the last call (the router's `reap`)."""
        if self.stopping or not self.runs:
            return []
        try:
            return self._reap(time.monotonic())
        except Exception:  # a Ray hiccup must not stop the router's loop: look again next time
            log.exception("watching the Ray actors failed")
            return []

    def _reap(self, now: float) -> list[str]:
        serving = self.router.views if self.router is not None else {}
        for name in [n for n in self._give_up_at if n in serving]:
            del self._give_up_at[name]  # back: a later death gets its own RESTART_WAIT_S
        pending = {ref: name for name, ref in self.runs.items() if ref is not None}
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
        dead = [pending[ref] for ref in done if pending[ref] in serving]
        for ref in done:
            self._exited(pending[ref], ref, now)
        dead += self._kill_silent(set(dead), now)
        for name in [n for n, due in self._due.items() if now >= due]:
            del self._due[name]
            self.start(name)
        return dead

    def _kill_silent(self, dead: set[str], now: float) -> list[str]:
        """Serving instances silent for `heartbeat_s` (hung, or cut off): killed, for Ray to restart."""
        silent = [n for n in (self.router.silent(self.heartbeat_s) if self.router is not None else ())
                  if n not in dead and self.runs.get(n) is not None]
        for name in silent:
            log.error("instance %s sent nothing for %gs; killing it for Ray to restart", name, self.heartbeat_s)
            ray.kill(self.actors[name], no_restart=False)
            self.runs[name] = None
            self._retry(name, now)
        return silent

    def _exited(self, name: str, ref: Any, now: float) -> None:
        self.runs[name] = None
        try:
            why = f"instance exited with code {ray.get(ref, timeout=0)}"
        except ray.exceptions.RayTaskError as exc:  # the instance raised
            why = str(exc)[-2000:]
            if name not in self.ever_ready:
                self.failed[name] = why  # it never came up: running it again would only fail again
                return
        except ray.exceptions.RayError as exc:  # its process or node died (or is restarting): Ray restarts it
            why = f"actor unavailable: {type(exc).__name__}"
        self.errors[name] = why
        self._retry(name, now)

    def _retry(self, name: str, now: float) -> None:
        give_up = self._give_up_at.setdefault(name, now + RESTART_WAIT_S)
        if now > give_up:
            self.failed[name] = f"not back within {RESTART_WAIT_S:g}s; last: {self.errors.get(name, '')}"
            log.error("instance %s: %s", name, self.failed[name])
        else:
            self._due[name] = now + RESUBMIT_EVERY_S

    def log_tail(self, name: str, chars: int = 2000) -> str:
        return self.errors.get(name, "")[-chars:]

    def pids(self) -> dict[str, int]:
        placed = self.router.placed if self.router is not None else {}
        return {name: p["pid"] for name, p in placed.items() if name in self.router.views}

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the instances to leave their loops (they were told to), sweep each node's shm, free Ray."""
        self.stopping = True
        running = [ref for ref in self.runs.values() if ref is not None]
        if running:
            ray.wait(running, num_returns=len(running), timeout=timeout_s)
        sweeps = [actor.sweep.remote(self.base.segment_prefix) for actor in self.actors.values()]
        if sweeps:
            ray.wait(sweeps, num_returns=len(sweeps), timeout=3.0)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)


def local_cpus(topology: Topology) -> int:
    """Logical CPUs for a private local cluster: enough for the topology, at least this machine's cores."""
    return max(os.cpu_count() or 1, cpus_needed(topology))

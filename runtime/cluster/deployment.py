"""A running topology: instance processes, the router thread, and the async surface in front of them.

`Deployment(model, instances="E,P,D")` is what the HTTP server and `epd.Runtime` talk to, whatever the
topology (`EPD` is one instance process). It starts every instance, waits until each says `Ready`
(or raises with the reason), and `shutdown()` leaves no process and no shared-memory segment behind.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import zmq

from runtime.cluster.instance import InstanceConfig
from runtime.cluster.launcher import Launcher, describe
from runtime.cluster.mailbox import LoopMailbox
from runtime.cluster.role_switch import SwitchPolicy, role_str
from runtime.cluster.router import Router
from runtime.cluster.topology import Topology, parse_topology
from runtime.cluster.transfer import make_transfer, sweep_segments
from runtime.config import EngineConfig
from runtime.messages import GenerateRequest, RequestOutput
from runtime.preprocess import Processor

log = logging.getLogger(__name__)
SUMMED = ("num_waiting_requests", "num_running_requests", "kv_used_pages", "kv_cached_pages",
          "kv_request_pages", "kv_total_pages", "num_preemptions", "num_requests_in_engine")


class DeploymentError(RuntimeError):
    """The deployment could not start (an instance failed or was not ready in time)."""


class Deployment:
    def __init__(self, model: str | Path, instances: str | Topology = "EPD", *, transfer: str = "shm",
                 ready_timeout_s: float = 300.0, max_waiting_requests: int | None = None,
                 ray: str | None = None, placement_timeout_s: float = 60.0, move_chooser: Any = None,
                 switch_policy: SwitchPolicy | None = None, **engine_overrides: Any) -> None:
        """`ray`: place the instances on a Ray cluster (`auto`, `HOST:PORT`, `ray://HOST:PORT`, or `local`
        for a private one); without it they are child processes here and Ray is not imported.
        `move_chooser`: under `role_switching`, a `role_switch.MoveChooser` in place of the queue rule;
        `switch_policy`: the switcher's thresholds and checks (default `SwitchPolicy()`)."""
        self.model_path = str(model)
        self.topology = instances if isinstance(instances, Topology) else parse_topology(instances)
        self.processor = Processor(model, compact_pixels=True)  # uint8 pixels to the instances
        self.ray = _connect_ray(ray, self.topology)
        self.id = uuid.uuid4().hex[:12]
        self.segment_prefix = f"epd-{self.id}"
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"{self.segment_prefix}-logs-"))
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        for opt in (zmq.ROUTER_MANDATORY, zmq.ROUTER_HANDOVER):
            self._sock.setsockopt(opt, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        host = self.ray.host if self.ray else "127.0.0.1"
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        base = InstanceConfig(name="", roles="", model=self.model_path, router_addr=f"tcp://{host}:{port}",
                              transfer=transfer, segment_prefix=self.segment_prefix,
                              engine_overrides=engine_overrides)
        page_size = engine_overrides.get("page_size", EngineConfig.page_size)
        if self.ray is None:
            self.launcher = Launcher(self.topology, base, self._log_dir)
            router_cls, router_transfer = Router, make_transfer(transfer, self.segment_prefix)
        else:
            from runtime.cluster.node_transfer import NodeTransfer
            from runtime.cluster.ray_placement import RayLauncher
            from runtime.cluster.ray_router import RayRouter

            self.launcher = RayLauncher(self.topology, base, self.ray, placement_timeout_s)
            router_cls, router_transfer = RayRouter, NodeTransfer(self.segment_prefix, self.ray.node_id)
        self.router = router_cls(self._sock, router_transfer, page_size, self.processor.image_token_id,
                                 self.launcher.reap)
        if self.ray is not None:
            self.launcher.router = self.router
        self.router.roles = {spec.name: spec.roles for spec in self.topology.instances}
        self.router.max_waiting = max_waiting_requests
        if engine_overrides.get("role_switching"):  # every instance loads both towers (role_engine.py)
            from runtime.cluster.role_switch import RoleSwitcher

            self.router.switcher = RoleSwitcher(self.router, switch_policy, move_chooser)
        self._ready: set[str] = set()
        self._all_ready = threading.Event()
        self.router.ready_event = self._on_ready
        self._thread = threading.Thread(target=self.router.run, name="router", daemon=True)
        self._closed = False
        self._mailboxes: dict[asyncio.AbstractEventLoop, LoopMailbox] = {}
        self._thread.start()
        try:
            self.launcher.start_all()
        except Exception as exc:
            self.shutdown()
            raise DeploymentError(f"topology {self.topology.spec}: {exc}") from exc
        self._wait_ready(ready_timeout_s)

    # ---- start-up ---------------------------------------------------------------------------------
    def _on_ready(self, name: str) -> None:
        self.launcher.ever_ready.add(name)
        self._ready.add(name)
        if self._ready >= set(self.launcher.specs):
            self._all_ready.set()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._all_ready.wait(0.2):
            if self.launcher.failed or time.monotonic() > deadline:
                why = self._not_ready_report(timeout_s)
                self.shutdown()
                raise DeploymentError(why)
        log.info("deployment %s ready: %s", self.id, self.topology.spec)

    def _not_ready_report(self, timeout_s: float) -> str:
        lines = [f"topology {self.topology.spec}: not every instance became ready"]
        for name in self.launcher.specs:
            if name in self.launcher.failed:
                lines.append(f"  {name}: {self.launcher.failed[name]}")
            elif name not in self._ready:
                tail = self.launcher.log_tail(name, 800)
                lines.append(f"  {name}: still loading after {timeout_s:g}s; log tail:\n{tail}")
        return "\n".join(lines)

    # ---- requests ---------------------------------------------------------------------------------
    async def generate(self, msg: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Submit and stream deltas. Typed admission errors are raised from the first iteration.
        Deltas that queued up while the consumer was busy come as one. Leaving the iterator early
        (disconnect, cancel) aborts the request everywhere."""
        outputs: asyncio.Queue = asyncio.Queue()
        self.router.post("submit", msg, partial(self._mailbox(asyncio.get_running_loop()).put, outputs))
        finished, held = False, None
        try:
            while not finished:
                item, held = held or await outputs.get(), None
                while isinstance(item, RequestOutput) and not item.finished and not outputs.empty():
                    later = outputs.get_nowait()
                    if isinstance(later, BaseException):
                        held = later
                        break
                    item = item.then(later)
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.router.post("abort", msg.rid)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        box = self._mailboxes.get(loop)
        if box is None:  # a new loop: forget the closed ones (epd.Runtime may run one per call)
            self._mailboxes = {lp: b for lp, b in self._mailboxes.items() if not lp.is_closed()}
            box = self._mailboxes[loop] = LoopMailbox(loop)
        return box

    def encode_ahead(self, images: Sequence[Any]) -> None:
        """Start encoding these `ImageInput`s now on the E instances; later requests find them cached."""
        self.router.post("encode_ahead", list(images))

    def request_control(self, op: str) -> Future:
        """Send `op` to every ready instance; the future gives {instance: reply}."""
        future: Future = Future()
        self.router.post("control", op, future)
        return future

    def switch_role(self, name: str, roles: str) -> None:
        """Move instance `name` to `roles` once it has drained (needs `role_switching=True`)."""
        if self.router.switcher is None:
            raise ValueError("this deployment was started without role switching")
        self.router.post("switch_role", name, frozenset(roles.upper()))

    def end_session(self, session_id: str) -> None:
        """The session's program ended: later requests with this id are no longer pinned to its instances
        (its KV stays in their prefix caches as ordinary, evictable entries)."""
        self.router.post("end_session", session_id)

    async def control(self, op: str) -> dict[str, dict]:
        return await asyncio.wait_for(asyncio.wrap_future(self.request_control(op)), 30)

    async def flush_cache(self) -> bool:
        results = await self.control("flush_cache")
        return all(r.get("ok", False) for r in results.values())

    async def integrity(self) -> dict[str, dict]:
        """Each instance's page accounting and cache invariants (`Engine.integrity`)."""
        return await self.control("integrity")

    async def snapshot(self) -> dict[str, Any]:
        """Engine figures summed over instances, plus each instance's own figures and router view."""
        return self._aggregate(await self.control("snapshot"))

    def snapshot_now(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """`snapshot` for synchronous callers (not on the event loop)."""
        return self._aggregate(self.request_control("snapshot").result(timeout_s))

    def _aggregate(self, per: dict[str, dict]) -> dict[str, Any]:
        keys = set(SUMMED) | {k for r in per.values() for k in r if k.startswith("stats_")}
        total: dict[str, Any] = {k: sum(r.get(k, 0) for r in per.values()) for k in sorted(keys)}
        total["kv_usage"] = total["kv_used_pages"] / total["kv_total_pages"] if total["kv_total_pages"] else 0.0
        for rate in ("prefix_cache_hit_rate", "encoder_cache_hit_rate"):
            values = [r[rate] for r in per.values() if rate in r]
            if values:
                total[rate] = sum(values) / len(values)
        views = {v.name: {"inflight": v.inflight, "encode_tokens": v.encode_tokens, "free_pages": v.free_pages,
                          "roles": role_str(v.roles),  # after a role switch, not the launched ones
                          "draining_to": None if v.draining_to is None else role_str(v.draining_to)}
                 for v in list(self.router.views.values())}
        total |= {f"router_{k}": v for k, v in self.router.stats.items()}
        pids = self.launcher.pids()
        placement = self.router.placement() if self.ray else {"instances": {}}
        total["instances"] = {name: {**describe(spec), "launched_roles": spec.role_str, **per.get(name, {}),
                                     **views.get(name, {}),
                                     "pid": pids.get(name), "ready": name in self.router.views,
                                     **placement["instances"].get(name, {})}
                              for name, spec in self.launcher.specs.items()}
        if self.ray:
            total["ray"] = {"address": self.ray.address, "router_node_id": self.ray.node_id,
                            "router_address": self.ray.host, "links": placement["links"]}
        return total

    # ---- lifecycle --------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def pids(self) -> dict[str, int]:
        return self.launcher.pids()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        self.launcher.stopping = True
        try:
            if self._thread.is_alive():
                self.router.post("stop")
                self._thread.join(timeout_s)
            self.launcher.stop(timeout_s)
        finally:  # whatever failed above, a socket left open would hang zmq's context at exit
            self._sock.close(0)
            self._ctx.term()
            if self.ray is not None:
                self.ray.close()
            leftovers = sweep_segments(self.segment_prefix)
            if leftovers:
                log.info("removed %d shared-memory segments left in flight", len(leftovers))
            shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _connect_ray(address: str | None, topology: Topology) -> Any:
    if address is None:
        return None
    try:
        from runtime.cluster.ray_placement import RayCluster, local_cpus
    except ImportError as exc:
        raise DeploymentError(f"--ray needs Ray: pip install 'epdlang[ray]' ({exc})") from exc
    try:
        return RayCluster(address, num_cpus=local_cpus(topology) if address == "local" else None)
    except Exception as exc:
        raise DeploymentError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from exc

"""One instance process: `python -m runtime.cluster.instance CONFIG_JSON`.

It connects a DEALER socket (identity = instance name) to the router, loads the weights its roles
need, says `Ready`, then alternates between draining control messages and one engine step. It exits on
`Shutdown`, or by itself when its parent (the launcher) is gone, so a killed deployment leaves no
orphans.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from epdlang.errors import EpdError
from runtime.cluster import wire
from runtime.cluster.node_transfer import NodeTransfer
from runtime.cluster.role_engine import RoleEngine
from runtime.cluster.transfer import make_transfer
from runtime.cluster.wire import (
    Abort,
    Control,
    ControlReply,
    Embedding,
    EncodeJob,
    Handoff,
    Outputs,
    Peers,
    Ready,
    Rejected,
    Shutdown,
    Submit,
)

log = logging.getLogger("runtime.cluster.instance")
LOAD_INTERVAL_S = 0.02
IDLE_POLL_MS = 50.0


@dataclass(frozen=True)
class InstanceConfig:
    name: str
    roles: str
    model: str
    router_addr: str
    transfer: str
    segment_prefix: str
    threads: int | None = None
    cores: tuple[int, ...] | None = None
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    node_id: str = ""  # on Ray: the node it runs on; tensors then go shm or tcp by the receiver's node
    address: str = ""


class Instance:
    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg, self.parent = cfg, os.getppid()
        self.transfer = (NodeTransfer(cfg.segment_prefix, cfg.node_id) if cfg.node_id
                         else make_transfer(cfg.transfer, cfg.segment_prefix))
        self.engine = RoleEngine(cfg.model, frozenset(cfg.roles), self.transfer, **cfg.engine_overrides)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, cfg.name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(cfg.router_addr)
        self.running, self._last_load, self._load_sent_at = True, None, 0.0
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self.engine.wake_r, zmq.POLLIN)

    def send(self, msg: Any, frames: list | None = None) -> None:
        self.sock.send_multipart(wire.encode(msg) + (frames or []), copy=False)

    def serve(self) -> None:
        self.send(Ready(self.cfg.name, os.getpid(), self.cfg.node_id, self.cfg.address))
        while self.running and os.getppid() == self.parent:
            events = dict(self.poller.poll(self._poll_ms()))
            if self.engine.wake_r in events:
                os.read(self.engine.wake_r, 4096)
            if self.sock in events:
                self._drain()
            if self.engine.has_unfinished():
                self._step()
            self._flush_outbox()
            self._report_load()

    def _poll_ms(self) -> float:
        """Wait for input this long: not at all while a step has work, up to the end of a decode hold, else 50 ms
        (the wake pipe and the socket end any wait early)."""
        wait = self.engine.wait_s if self.engine.has_unfinished() else None
        return IDLE_POLL_MS if wait is None else min(IDLE_POLL_MS, wait * 1e3)

    def _drain(self) -> None:
        while self.running and self.sock.poll(0):
            frames = self.sock.recv_multipart(copy=False)
            try:
                msg, data = wire.decode([f.buffer for f in frames])
            except wire.WireError:
                log.exception("dropped a frame that is not a message")
                continue
            try:
                self._handle(msg, data)
            except Exception as exc:  # a bad message must not stop the loop
                log.exception("failed to handle %s", type(msg).__name__)
                rid = getattr(getattr(msg, "req", None), "rid", None)
                if rid is not None:
                    self.send(Rejected(rid, type(exc).__name__, str(exc)))

    def _handle(self, msg: Any, data: list) -> None:
        if isinstance(msg, Submit):
            pixels = self._open_pixels(msg.req.images, data)
            try:
                self.engine.submit_wire(msg.req, msg.incoming, pixels)
            except EpdError as exc:
                self.send(Rejected(msg.req.rid, type(exc).__name__, str(exc)))
        elif isinstance(msg, EncodeJob):
            pixels = self._open_pixels((msg.image,), data).get(msg.image.content_hash)
            self.engine.queue_encode(msg, pixels)
        elif isinstance(msg, Embedding):
            hidden = self.engine.model.config.hidden_size
            emb = self.transfer.open(msg.embeds, data, dtype=self.engine.model.dtype, shape=(None, hidden))
            self.engine.provide_embedding(msg.content_hash, emb)
        elif isinstance(msg, Handoff):
            self._adopt(msg, data)
        elif isinstance(msg, Abort):
            self.engine.abort(msg.rid)
        elif isinstance(msg, Control):
            self.send(self._control(msg))
        elif isinstance(msg, Shutdown):
            self.running = False
        elif isinstance(msg, Peers) and isinstance(self.transfer, NodeTransfer):
            self.transfer.nodes, self.transfer.roles = dict(msg.nodes), dict(msg.roles)

    def _open_pixels(self, images, data: list) -> dict[str, torch.Tensor]:
        sent = list({im.content_hash: im for im in images if im.pixels is not None}.values())
        frames = wire.split_frames([im.pixels for im in sent], data)
        model_shape = self.engine.model.pixel_shape()  # the model's pixel layout: patches, or fixed-size images
        pattern = self.engine.processor.pixel_pattern
        return {im.content_hash: self.transfer.open(im.pixels, f, shape=pattern(im.pixels.dtype, model_shape))
                for im, f in zip(sent, frames)}

    def _adopt(self, msg: Handoff, data: list) -> None:
        n = len(msg.req.input_ids)
        kv = self.transfer.open(msg.kv, data, dtype=self.engine.kv_pool.k.dtype, shape=self.engine.kv_shape(n))
        try:
            self.engine.adopt(msg, kv)
        except EpdError as exc:
            self.send(Rejected(msg.req.rid, type(exc).__name__, str(exc)))

    def _control(self, msg: Control) -> ControlReply:
        try:
            if msg.op == "flush_cache":
                return ControlReply(msg.call_id, {"ok": self.engine.flush_cache()})
            if msg.op == "snapshot":
                return ControlReply(msg.call_id, self.engine.snapshot())
            if msg.op == "integrity":
                return ControlReply(msg.call_id, self.engine.integrity())
            if msg.op.startswith("set_roles:"):
                self.engine.set_roles(frozenset(msg.op.split(":", 1)[1]))
                return ControlReply(msg.call_id, {"roles": "".join(sorted(self.engine.roles))})
            return ControlReply(msg.call_id, {}, error=f"unknown control op {msg.op!r}")
        except Exception as exc:
            return ControlReply(msg.call_id, {}, error=str(exc))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:
            log.exception("engine step failed; failing the requests in flight")
            outputs = self.engine.fail_all("internal error in the engine step")
        if outputs:
            self.send(Outputs(tuple(outputs)))

    def _flush_outbox(self) -> None:
        while self.engine.outbox:
            msg = self.engine.outbox.popleft()
            if isinstance(self.transfer, NodeTransfer):
                self.send(*self.transfer.outgoing(msg))
            else:
                self.send(msg, wire.data_frames(self.transfer, msg))

    def _report_load(self) -> None:
        """Send the load when it changed (at most every LOAD_INTERVAL_S), and at least once a second."""
        now, load = time.monotonic(), self.engine.load()
        age = now - self._load_sent_at
        if (load != self._last_load and age >= LOAD_INTERVAL_S) or age >= 1.0:
            self._last_load, self._load_sent_at = load, now
            self.send(load)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def main(argv: list[str]) -> int:
    raw = json.loads(argv[0])
    cfg = InstanceConfig(**{**raw, "cores": tuple(raw["cores"]) if raw.get("cores") else None})
    logging.basicConfig(level=os.environ.get("EPD_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s {cfg.name} %(levelname)s %(name)s: %(message)s")
    if cfg.cores:
        os.sched_setaffinity(0, cfg.cores)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    instance = Instance(cfg)
    try:
        instance.serve()
    finally:
        instance.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The router of a deployment on Ray: the same router, plus where each instance runs.

- It learns each instance's Ray node id from its `Ready` and tells every instance (`Peers`), so that
  senders keep tensors in shm for a receiver on their node and send zmq frames over TCP otherwise.
- A handoff whose KV P kept in shm goes to a D on P's node; other handoffs to any D, by load.
- Pixels it exports itself go the same way: shm to an instance on its own node, a frame to the others.
- It says again where everyone runs whenever the instances or their roles change (deaths, role switches).
- It records the transport of every tensor it relays, per link (`links`), for /get_server_info and /metrics.
- It notes when it last heard from each instance: `silent(after_s)` names the ready ones gone quiet
  (every instance reports its load at least once a second), which the Ray launcher treats as dead.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any

from runtime.cluster import wire
from runtime.cluster.node_transfer import TRANSPORT, NodeTransfer
from runtime.cluster.router import Router


class RayRouter(Router):
    transfer: NodeTransfer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.placed: dict[str, dict[str, Any]] = {}  # name -> node_id, address, pid of its latest Ready
        self.links: Counter[tuple[str, str, str]] = Counter()  # (src, dst, transport) -> tensors relayed
        self.link_bytes: Counter[tuple[str, str, str]] = Counter()
        self.last_heard: dict[str, float] = {}
        self._relaying_from: str | None = None
        self._decode_node: str | None = None  # while routing a handoff in shm: D must be on this node

    def _on_ready(self, name: str, msg: wire.Ready, data: list) -> None:
        self.placed[name] = {"node_id": msg.node_id, "address": msg.address, "pid": msg.pid}
        self.transfer.nodes[name] = msg.node_id
        self.last_heard[name] = time.monotonic()
        super()._on_ready(name, msg, data)
        self._broadcast_peers()

    def _peers(self) -> wire.Peers:
        nodes = {n: self.placed[n]["node_id"] for n in self.views if n in self.placed}
        return wire.Peers(nodes, {n: "".join(sorted(v.roles)) for n, v in self.views.items()})

    def _broadcast_peers(self) -> None:
        peers = self._peers()
        self.transfer.roles = peers.roles
        for name in self.views:
            self._send(name, peers)

    def _retry_waiting(self) -> None:
        super()._retry_waiting()
        if self._peers().roles != self.transfer.roles:  # an instance died or switched roles
            self._broadcast_peers()

    def _on_load(self, name: str, msg: wire.Load, data: list) -> None:
        self.last_heard[name] = time.monotonic()
        super()._on_load(name, msg, data)

    def _on_outputs(self, name: str, msg: wire.Outputs, data: list) -> None:
        self.last_heard[name] = time.monotonic()
        super()._on_outputs(name, msg, data)

    def _on_encodedone(self, name: str, msg: wire.EncodeDone, data: list) -> None:
        self._relaying_from = name
        try:
            super()._on_encodedone(name, msg, data)
        finally:
            self._relaying_from = None

    def _route_handoff(self, msg: wire.Handoff, data: list, since: float) -> None:
        """A handoff whose KV is in shm goes to a D on P's node (P kept it there because one is)."""
        flight = self.flights.get(msg.req.rid)
        if flight is not None and msg.kv.backend == "shm":
            self._decode_node = self.transfer.nodes.get(flight.p or "")
        try:
            super()._route_handoff(msg, data, since)
        finally:
            self._decode_node = None

    def _ready(self, role: str) -> list:
        views = super()._ready(role)
        if role == "D" and self._decode_node is not None:
            views = [v for v in views if self.transfer.nodes.get(v.name) == self._decode_node]
        return views

    def silent(self, after_s: float) -> list[str]:
        now = time.monotonic()
        return [n for n in self.views if now - self.last_heard.get(n, now) > after_s]

    # ---- sending ------------------------------------------------------------------------------------
    def _send(self, name: str, msg: Any, frames: list | None = None) -> None:
        if isinstance(msg, (wire.Submit, wire.EncodeJob)):
            msg, frames = self._pixels_for(name, msg, frames or [])
        self._count_links(name, msg)
        super()._send(name, msg, frames)

    def _pixels_for(self, name: str, msg: Any, frames: list) -> tuple[Any, list]:
        """Our shm pixel handles stay shm for an instance on our node; for any other, they become frames."""
        images = msg.req.images if isinstance(msg, wire.Submit) else (msg.image,)
        if self.transfer.is_local([name]) or not any(im.pixels and im.pixels.backend == "shm" for im in images):
            return msg, frames
        converted: dict[str, Any] = {}
        out_frames = []
        for im in images:  # frames in order of first appearance per hash, as the instance splits them
            if im.pixels is not None and im.content_hash not in converted:
                handle, frame = self.transfer.to_frame(im.pixels)
                converted[im.content_hash] = handle
                out_frames.append(frame)
        fixed = tuple(dataclasses.replace(im, pixels=converted.get(im.content_hash, im.pixels)) for im in images)
        if isinstance(msg, wire.Submit):
            return dataclasses.replace(msg, req=dataclasses.replace(msg.req, images=fixed)), out_frames
        return dataclasses.replace(msg, image=fixed[0]), out_frames

    def _count_links(self, name: str, msg: Any) -> None:
        if isinstance(msg, wire.Submit):
            handles = [("router", im.pixels) for im in msg.req.images if im.pixels is not None]
        elif isinstance(msg, wire.EncodeJob):
            handles = [("router", msg.image.pixels)] if msg.image.pixels is not None else []
        elif isinstance(msg, wire.Embedding):
            handles = [(self._relaying_from or "?", msg.embeds)]
        elif isinstance(msg, wire.Handoff):
            flight = self.flights.get(msg.req.rid)
            handles = [(flight.p if flight else "?", msg.kv)]
        else:
            return
        for src, handle in handles:
            key = (src, name, TRANSPORT.get(handle.backend, handle.backend))
            self.links[key] += 1
            self.link_bytes[key] += handle.nbytes

    def placement(self) -> dict[str, Any]:
        """Where each instance runs and how tensors crossed each link, for the server's info and metrics."""
        links = [{"src": s, "dst": d, "transport": t, "tensors": n, "bytes": self.link_bytes[(s, d, t)]}
                 for (s, d, t), n in sorted(self.links.items())]
        return {"instances": {n: dict(p) for n, p in self.placed.items()}, "links": links}

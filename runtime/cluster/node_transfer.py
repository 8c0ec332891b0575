"""Data plane by locality, for deployments spread over Ray nodes.

Senders write every tensor into shared memory (zero-copy fill). When a message leaves for an instance on
another Ray node (or for one whose node is not known yet), `outgoing` turns each shm handle into a zmq
handle plus one raw frame over the mapped pages (no copy: the frame holds the mapping until it is sent)
and frees the segment's name. Locality is by Ray node id, not IP: two nodes on one host are two nodes.
The receiver opens either kind (`open` dispatches on `handle.backend`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from runtime.cluster.transfer import (
    Frame,
    ShapePattern,
    ShmTransfer,
    TensorHandle,
    TransferBackend,
    TransferError,
    ZmqFrameTransfer,
)

HANDLE_FIELDS = ("kv", "embeds")
TRANSPORT = {"shm": "shm", "zmq": "tcp"}  # how the bytes of a handle travel between processes


class NodeTransfer(TransferBackend):
    name = "node"

    def __init__(self, prefix: str, node_id: str = "") -> None:
        self.shm, self.zmq = ShmTransfer(prefix), ZmqFrameTransfer(prefix)
        self.node_id = node_id
        self.nodes: dict[str, str] = {}  # instance name -> Ray node id (from the router's Peers)
        self.roles: dict[str, str] = {}  # instance name -> its roles, e.g. "PD"

    def _of(self, handle: TensorHandle) -> TransferBackend:
        return self.zmq if handle.backend == "zmq" else self.shm

    def allocate(self, dtype: torch.dtype, shape: Sequence[int]) -> tuple[TensorHandle, torch.Tensor]:
        return self.shm.allocate(dtype, shape)

    def frames(self, handle: TensorHandle) -> list[Frame]:
        return self._of(handle).frames(handle)

    def open(self, handle: TensorHandle, frames: Sequence[Frame] = (), *,
             dtype: torch.dtype | None = None, shape: ShapePattern | None = None) -> torch.Tensor:
        return self._of(handle).open(handle, frames, dtype=dtype, shape=shape)

    def release(self, handle: TensorHandle) -> None:
        try:
            self._of(handle).release(handle)
        except TransferError:
            pass  # a handle of another prefix or node: nothing of ours to free

    # ---- locality ---------------------------------------------------------------------------------
    def is_local(self, names: Iterable[str]) -> bool:
        """Every named instance is known to run on this node (an unknown one counts as remote)."""
        nodes = [self.nodes.get(n) for n in names]
        return bool(nodes) and bool(self.node_id) and all(node == self.node_id for node in nodes)

    def keeps_shm(self, msg: Any) -> bool:
        """Whether the tensors of `msg` can stay in shm: its destination is on this node, or for a handoff
        (whose D the router picks) some D is, as the router then picks one of those."""
        dest = getattr(msg, "dest", None)
        if dest is not None:
            return self.is_local([dest])
        return any(self.is_local([name]) for name, roles in self.roles.items() if "D" in roles)

    def outgoing(self, msg: Any) -> tuple[Any, list[Frame]]:
        """`msg` and its data frames, with shm handles made zmq frames unless they can stay in shm."""
        local = self.keeps_shm(msg)
        changes, frames = {}, []
        for field in HANDLE_FIELDS:
            handle = getattr(msg, field, None)
            if handle is None:
                continue
            if handle.backend == "shm" and not local:
                handle, frame = self.to_frame(handle)
                changes[field] = handle
                frames.append(frame)
            else:
                frames += self.frames(handle)
        return (dataclasses.replace(msg, **changes) if changes else msg), frames

    def to_frame(self, handle: TensorHandle) -> tuple[TensorHandle, Frame]:
        """A zmq handle and its frame for the bytes of shm `handle` (this process wrote them)."""
        tensor = self.shm.open(handle)  # claims and unlinks the name; the mapping lives with the frame
        raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
        return TensorHandle("zmq", "", handle.dtype, handle.shape, handle.nbytes), memoryview(raw.numpy())

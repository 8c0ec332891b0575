"""`NodeTransfer`, the data plane by locality (no Ray needed): a tensor stays in shm for a receiver on the
sender's Ray node and becomes one zmq frame (over the same pages, no copy) for any other or unknown one."""
from __future__ import annotations

import uuid

import pytest
import torch

from runtime.cluster.node_transfer import NodeTransfer
from runtime.cluster.transfer import list_segments
from runtime.cluster.wire import EncodeDone, Handoff, WireRequest, decode, encode


@pytest.fixture
def prefix():
    name = f"epd-test-{uuid.uuid4().hex[:8]}"
    yield name
    assert not list_segments(name)


def sender(prefix: str) -> NodeTransfer:
    t = NodeTransfer(prefix, "node-1")
    t.nodes = {"P0": "node-1", "P1": "node-2", "D0": "node-2"}
    t.roles = {"P0": "P", "P1": "P", "D0": "D"}
    return t


def shipped(t: NodeTransfer, dtype=torch.bfloat16) -> tuple[torch.Tensor, object]:
    src = torch.randn(5, 7).to(dtype)
    handle, buf = t.allocate(dtype, (5, 7))
    buf.copy_(src)
    del buf
    t.seal(handle)
    return src, handle


def across_the_wire(msg, frames):
    """What the receiver gets: the message re-decoded from our msgspec frames, the data frames as bytes."""
    got, data = decode([bytes(f) for f in encode(msg) + frames])
    return got, data


@pytest.mark.parametrize("dest,backend,n_frames", [("P0", "shm", 0), ("P1", "zmq", 1), ("P9", "zmq", 1)])
def test_embeddings_by_the_destination_node(prefix, dest, backend, n_frames):
    t = sender(prefix)
    src, handle = shipped(t)
    msg, frames = t.outgoing(EncodeDone("h", dest, handle))
    assert msg.embeds.backend == backend and len(frames) == n_frames
    if backend == "zmq":
        assert not list_segments(prefix)  # the segment's name is gone; the frame holds the pages
    got, data = across_the_wire(msg, frames)
    out = NodeTransfer(prefix, "other").open(got.embeds, data, dtype=torch.bfloat16, shape=(None, 7))
    assert torch.equal(out, src)


def test_kv_stays_in_shm_only_when_some_d_is_beside_p(prefix):
    t = sender(prefix)
    req = WireRequest("r", (1, 2, 3))
    _, handle = shipped(t, torch.float32)
    msg, frames = t.outgoing(Handoff(req, (4,), handle, 0))
    assert msg.kv.backend == "zmq" and len(frames) == 1 and not list_segments(prefix)
    t.roles["P0"] = "PD"  # an instance beside us now decodes (a role switch): the router picks it
    _, handle = shipped(t, torch.float32)
    msg, frames = t.outgoing(Handoff(req, (4,), handle, 0))
    assert msg.kv.backend == "shm" and frames == []
    t.release(msg.kv)
    t.release(msg.kv)  # idempotent, and a zmq handle or another prefix's is no error
    NodeTransfer("epd-someone-else").release(msg.kv)


def test_outside_ray_nothing_is_local(prefix):
    t = NodeTransfer(prefix)  # no node id: every receiver counts as remote
    t.nodes = {"P0": ""}
    _, handle = shipped(t)
    msg, frames = t.outgoing(EncodeDone("h", "P0", handle))
    assert msg.embeds.backend == "zmq" and len(frames) == 1

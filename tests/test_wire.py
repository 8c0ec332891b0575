"""The control plane only ever builds our message types: no pickle, unknown kinds and bad payloads refused."""
from __future__ import annotations

import pickle

import pytest

from epdlang.sampling import SamplingParams
from runtime.cluster import wire
from runtime.cluster.transfer import TensorHandle
from runtime.messages import RequestOutput, TokenLogprob


def test_round_trip_of_nested_messages():
    handle = TensorHandle("shm", "epd-x-1", "float32", (2, 3), 24)
    req = wire.WireRequest("r1", (1, 2, 3), (wire.WireImage("h", (1, 4, 4), 4, handle),),
                           SamplingParams(max_new_tokens=3, stop=("x",), json_schema='{"type": "object"}'))
    for msg in (wire.Submit(req, ("h",)),
                wire.Handoff(req, (5,), handle, 2, (None, TokenLogprob(4, -0.5, ((4, -0.5),))), b"\x00\x01"),
                wire.Outputs((RequestOutput("r1", (7,), "a", logprobs=(TokenLogprob(7, -1.0),)),)),
                wire.Control(3, "snapshot"), wire.Shutdown()):
        decoded, data = wire.decode(wire.encode(msg) + [b"frame"])
        assert decoded == msg and data == [b"frame"]


def test_pickle_and_unknown_kinds_are_refused():
    evil = pickle.dumps(RequestOutput("r1"))
    with pytest.raises(wire.WireError, match="unknown message kind"):
        wire.decode([b"RequestOutput", evil])
    with pytest.raises(wire.WireError, match="malformed Submit"):
        wire.decode([b"Submit", evil])
    with pytest.raises(wire.WireError, match="malformed Abort"):
        wire.decode([b"Abort", wire.encode(wire.Control(1, "x"))[1]])
    with pytest.raises(wire.WireError):
        wire.decode([b"Abort"])
    with pytest.raises(wire.WireError):
        wire.encode(RequestOutput("r1"))


def test_split_frames_matches_handles_in_order():
    shm = TensorHandle("shm", "epd-x-1", "uint8", (1,), 1)
    zmq_ = TensorHandle("zmq", "", "uint8", (1,), 1)
    assert wire.split_frames([zmq_, shm, zmq_, None], [b"a", b"b"]) == [[b"a"], [], [b"b"], []]

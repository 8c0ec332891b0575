"""The tensor data plane: real shared memory, real zmq sockets, real child processes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import zmq

from runtime.cluster.transfer import (
    ShmTransfer,
    TensorHandle,
    TransferError,
    ZmqFrameTransfer,
    list_segments,
    make_transfer,
    shm_dir,
    sweep_segments,
)

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(3, 5), (7,), (), (0,), (2, 0, 4), (4, 1, 3)]
DTYPES = [torch.float32, torch.int64, torch.bfloat16]


@pytest.fixture
def prefix():
    p = f"epdtest-{uuid.uuid4().hex[:12]}"
    yield p
    assert sweep_segments(p) == [], "a test left shared-memory segments behind"


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.float32)[: torch.Size(shape).numel()]
    return (values * 1.5 - 7).to(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("backend", ["shm", "zmq"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(backend, dtype, shape, prefix):
    sender, receiver = make_transfer(backend, prefix), make_transfer(backend, prefix)
    src = sample(dtype, shape)
    handle, frames = sender.export(src)
    assert handle.shape == shape and handle.nbytes == src.numel() * src.element_size()
    out = receiver.open(TensorHandle.from_dict(json.loads(json.dumps(handle.to_dict()))), frames, dtype=dtype)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert raw_bytes(out) == raw_bytes(src)
    assert list_segments(prefix) == []


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_zero_copy_fill_in_place(backend, prefix):
    transfer = make_transfer(backend, prefix)
    pool = torch.randn(10, 4, 8)
    idx = torch.tensor([7, 2, 5])
    handle, out = transfer.allocate(pool.dtype, (3, 4, 8))
    ptr = out.data_ptr()
    torch.index_select(pool, 0, idx, out=out)
    assert out.data_ptr() == ptr  # filled in transfer memory, not reallocated
    del out
    transfer.seal(handle)
    got = transfer.open(handle, transfer.frames(handle), shape=(None, 4, 8))
    assert torch.equal(got, pool[idx])


def test_shm_open_unlinks_but_tensor_stays_valid(prefix):
    transfer = ShmTransfer(prefix)
    src = torch.randn(64, 32)
    handle, _ = transfer.export(src)
    assert list_segments(prefix) == [handle.name]
    got = transfer.open(handle)
    assert list_segments(prefix) == []
    got.add_(1)  # the receiver may write its own copy
    assert torch.equal(got, src + 1)
    with pytest.raises(TransferError, match="gone"):
        transfer.open(handle)


def test_shm_mapping_lives_exactly_as_long_as_the_tensor(prefix):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    transfer = ShmTransfer(prefix)
    handle, _ = transfer.export(torch.ones(1024))
    got = transfer.open(handle)
    assert handle.name in maps.read_text()
    del got
    assert handle.name not in maps.read_text()


def test_kept_tensors_hold_no_file_descriptors(prefix):
    """A receiver keeps embeddings for its encoder cache: mappings must not pin one fd each (a P instance
    ran out of fds under a soak run when they did)."""
    transfer = ShmTransfer(prefix)
    fds = len(os.listdir("/proc/self/fd"))
    sent, kept = [], []
    for i in range(64):
        handle, tensor = transfer.allocate(torch.float32, (4, 8))
        tensor.fill_(i)
        transfer.seal(handle)
        sent.append(tensor)
        kept.append(transfer.open(handle, dtype=torch.float32, shape=(None, 8)))
    assert len(os.listdir("/proc/self/fd")) == fds
    assert [int(t[0, 0]) for t in kept] == list(range(64)) and not list_segments(prefix)


def test_claim_refuses_a_symlink(prefix, tmp_path):
    transfer = ShmTransfer(prefix)
    handle, _ = transfer.allocate(torch.float32, (2,))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 8)
    path = Path(shm_dir()) / handle.name
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(TransferError, match="regular file"):
        transfer.open(handle)
    assert target.exists() and not path.exists() and not list_segments(prefix)


def test_seal_while_sender_still_holds_its_tensor(prefix):
    transfer = ShmTransfer(prefix)
    handle, out = transfer.allocate(torch.float32, (16,))
    out.fill_(3.0)
    transfer.seal(handle)  # must not unmap under the live tensor
    assert out.sum().item() == 48.0
    assert transfer.open(handle).sum().item() == 48.0


def test_shm_truncated_segment(prefix):
    transfer = ShmTransfer(prefix)
    handle, _ = transfer.export(torch.randn(100))
    os.truncate(os.path.join(shm_dir(), handle.name), 40)
    with pytest.raises(TransferError, match="size"):
        transfer.open(handle)
    assert list_segments(prefix) == []  # open took ownership, so the failure freed it


def test_zmq_short_frame():
    transfer = ZmqFrameTransfer()
    handle, frames = transfer.export(torch.randn(100))
    with pytest.raises(TransferError, match="size"):
        transfer.open(handle, [bytes(frames[0])[:-4]])
    with pytest.raises(TransferError, match="1 frame"):
        transfer.open(handle, [])


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_metadata_mismatches(backend, prefix):
    transfer = make_transfer(backend, prefix)
    cases = [
        ({"dtype": "float16"}, {"dtype": torch.float32}, "dtype mismatch"),
        ({"dtype": "complex7"}, {}, "unknown dtype"),
        ({}, {"shape": (4, None)}, "shape mismatch"),
        ({}, {"shape": (3,)}, "shape mismatch"),
        ({"shape": (3, 3)}, {}, "size mismatch"),
        ({"nbytes": 10}, {}, "size mismatch"),
    ]
    for change, expect, message in cases:
        handle, frames = transfer.export(torch.zeros(3, 4, dtype=torch.float16))
        bad = TensorHandle(**{**handle.to_dict(), "shape": handle.shape, **change})
        with pytest.raises(TransferError, match=message):
            transfer.open(bad, frames, **expect)
        transfer.release(handle)


def test_shm_rejects_foreign_names(prefix):
    transfer = ShmTransfer(prefix)
    for name in ["../etc/passwd", "other-abc", f"{prefix}-x/../../y"]:
        with pytest.raises(TransferError, match="not a segment"):
            transfer.open(TensorHandle("shm", name, "uint8", (1,), 1))
    with pytest.raises(TransferError, match="zmq handle"):
        transfer.open(TensorHandle("zmq", "", "uint8", (1,), 1), [b"x"])
    with pytest.raises(ValueError):
        ShmTransfer("")


def test_unsupported_dtype_and_backend(prefix):
    with pytest.raises(TransferError, match="cannot be transferred"):
        ShmTransfer(prefix).export(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown transfer backend"):
        make_transfer("nixl", prefix)


def test_zmq_frames_are_handed_over_once():
    transfer = ZmqFrameTransfer()
    handle, out = transfer.allocate(torch.int32, (4,))
    out.copy_(torch.tensor([1, 2, 3, 4]))
    (frame,) = transfer.frames(handle)
    with pytest.raises(TransferError, match="no pending buffer"):
        transfer.frames(handle)
    transfer.release(handle)  # already handed over: a no-op
    assert transfer.open(handle, [frame]).tolist() == [1, 2, 3, 4]
    readonly = transfer.open(handle, [bytes(frame)])  # read-only buffer: copied, so safe to write
    readonly.add_(1)
    assert bytes(frame) == bytes(memoryview(torch.tensor([1, 2, 3, 4], dtype=torch.int32).numpy()))


def test_zmq_misaligned_frame_is_copied_not_misread():
    src = torch.arange(6, dtype=torch.int64)
    buffer = bytearray(1) + bytearray(raw_bytes(src))
    handle = TensorHandle("zmq", "", "int64", (6,), 48)
    assert torch.equal(ZmqFrameTransfer().open(handle, [memoryview(buffer)[1:]]), src)


def child(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


PATIENT_RECEIVER = """
import json, sys
print("ready", flush=True)
sys.stdin.readline()
from runtime.cluster.transfer import ShmTransfer, TensorHandle
ShmTransfer(sys.argv[2]).open(TensorHandle.from_dict(json.loads(sys.argv[1])))
"""


def test_receiver_killed_before_open(prefix):
    sender = ShmTransfer(prefix)
    handle, _ = sender.export(torch.randn(256))
    receiver = child(PATIENT_RECEIVER, json.dumps(handle.to_dict()), prefix, stdin=subprocess.PIPE)
    assert receiver.stdout.readline() == "ready\n"  # holds the handle, has not opened it
    receiver.send_signal(signal.SIGKILL)
    assert receiver.wait(timeout=10) == -signal.SIGKILL
    receiver.stdin.close(), receiver.stdout.close(), receiver.stderr.close()
    assert list_segments(prefix) == [handle.name]
    sender.release(handle)
    assert list_segments(prefix) == []
    sender.release(handle)  # idempotent
    with pytest.raises(TransferError, match="gone"):
        sender.open(handle)


def test_sweep_segments(prefix):
    transfer = ShmTransfer(prefix)
    names = sorted(transfer.export(torch.ones(8))[0].name for _ in range(3))
    neighbour = ShmTransfer(f"{prefix}x")  # a prefix that merely starts the same is someone else's
    other, _ = neighbour.export(torch.ones(1))
    assert sweep_segments(prefix) == names
    assert list_segments(prefix) == [] and sweep_segments(prefix) == []
    neighbour.release(other)


CHILD_RECEIVER = """
import hashlib, json, sys
import torch
import zmq
from runtime.cluster.transfer import ShmTransfer, TensorHandle, ZmqFrameTransfer
shm = ShmTransfer(sys.argv[2]).open(TensorHandle.from_dict(json.loads(sys.argv[1])))
sock = zmq.Context.instance().socket(zmq.PULL)
sock.connect(sys.argv[3])
meta, frame = sock.recv_multipart(copy=False)
got = ZmqFrameTransfer().open(TensorHandle.from_dict(json.loads(meta.bytes)), [frame])
for t in (shm, got):
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    print(t.dtype, list(t.shape), t.double().sum().item(), hashlib.sha256(raw).hexdigest())
"""


def digest(t: torch.Tensor) -> str:
    return f"{t.dtype} {list(t.shape)} {t.double().sum().item()} {hashlib.sha256(raw_bytes(t)).hexdigest()}"


def test_cross_process(prefix, tmp_path):
    shm_src = torch.randn(33, 17)
    zmq_src = torch.randn(5, 6, 7).to(torch.bfloat16)
    shm_handle, _ = ShmTransfer(prefix).export(shm_src)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    address = f"ipc://{tmp_path}/frames"
    sock.bind(address)
    try:
        receiver = child(CHILD_RECEIVER, json.dumps(shm_handle.to_dict()), prefix, address)
        zmq_handle, frames = ZmqFrameTransfer().export(zmq_src)
        sock.send_multipart([json.dumps(zmq_handle.to_dict()).encode(), *frames], copy=False)
        out, err = receiver.communicate(timeout=60)
    finally:
        sock.close(linger=0)
    assert receiver.returncode == 0, err
    assert out.splitlines() == [digest(shm_src), digest(zmq_src)]
    assert list_segments(prefix) == []


@pytest.mark.parametrize("backend", ["shm", "zmq"])
def test_export_of_a_strided_view_sends_its_values_in_row_major_order(backend, prefix):
    transfer = make_transfer(backend, prefix)
    src = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()[1:]  # (5, 4), not contiguous
    handle, frames = transfer.export(src)
    assert torch.equal(transfer.open(handle, frames, shape=(5, 4)), src)
    assert list_segments(prefix) == []

"""Data plane between instance processes: tensors move E->P (image embeddings) and P->D (KV) without pickle.

A `TensorHandle` is plain metadata that rides in the control message; the bytes travel beside it.
`shm` keeps them in a named shared-memory file on the same host (zero-copy at both ends); `zmq` sends
them as a raw frame next to the control message (any host, one copy at most). GPU-direct paths
(CUDA IPC, NCCL, NIXL) would be further entries of `TRANSFER_BACKENDS`; none is built (no GPU here).
"""
from __future__ import annotations

import math
import os
import stat
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import zmq

from epdlang.errors import EpdError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

Frame = bytes | bytearray | memoryview | zmq.Frame
ShapePattern = Sequence[int | None]  # None matches any size in that dimension


class TransferError(EpdError):
    """A tensor could not be handed over: bad handle, missing or truncated buffer."""

    status = 500
    code = "transfer_error"


@dataclass(frozen=True)
class TensorHandle:
    backend: str  # a TRANSFER_BACKENDS key
    name: str  # shm: segment file name; zmq: ""
    dtype: str  # a DTYPES key
    shape: tuple[int, ...]
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorHandle:
        try:
            return cls(**{**d, "shape": tuple(d["shape"])})
        except (KeyError, TypeError) as e:
            raise TransferError(f"malformed tensor handle {d!r}: {e}") from None


class TransferBackend(ABC):
    """Moves one tensor from a sender process to a receiver process.

    Ownership: the sender owns the memory from `allocate` (or `export`) until it sends the handle
    (plus `frames(handle)`) in a control message; it must not write to its tensor afterwards.
    The receiver takes ownership by calling `open` exactly once; the memory then lives as long as
    the tensor `open` returns. If the receiver will never open the handle (it died, the request was
    aborted), the sender calls `release(handle)`. Whatever a crash leaves behind, `sweep_segments`
    removes at deployment shutdown.
    """

    name: ClassVar[str]

    @abstractmethod
    def allocate(self, dtype: torch.dtype, shape: Sequence[int]) -> tuple[TensorHandle, torch.Tensor]:
        """A writable tensor backed by transfer memory; the sender fills it in place (zero-copy write,
        e.g. `torch.index_select(src, 0, idx, out=t)`; `out` must already have the right shape, or torch
        reallocates it elsewhere). After filling, the sender calls `seal(handle)` and/or drops the tensor."""

    @abstractmethod
    def frames(self, handle: TensorHandle) -> list[Frame]:
        """The extra zmq frames that must travel with the control message ([] when the bytes go elsewhere)."""

    @abstractmethod
    def open(self, handle: TensorHandle, frames: Sequence[Frame] = (), *,
             dtype: torch.dtype | None = None, shape: ShapePattern | None = None) -> torch.Tensor:
        """Receiver side: take ownership of the tensor behind `handle`.

        Validates before use: known dtype, equal to `dtype` if given; prod(shape) * itemsize == nbytes;
        the shape matches `shape` (None entries are wildcards); the buffer really holds nbytes.
        Any failure raises TransferError.
        """

    @abstractmethod
    def release(self, handle: TensorHandle) -> None:
        """The receiver will never open `handle`: free its memory. Idempotent; an unknown handle is fine."""

    def seal(self, handle: TensorHandle) -> None:  # noqa: B027 (a no-op unless the backend maps memory)
        """The sender has finished filling the tensor of `handle`."""

    def export(self, tensor: torch.Tensor) -> tuple[TensorHandle, list[Frame]]:
        """Copy `tensor` (any device, any layout) into transfer memory: its handle and frames to send."""
        handle, out = self.allocate(tensor.dtype, tuple(tensor.shape))
        out.copy_(tensor)
        del out
        self.seal(handle)
        return handle, self.frames(handle)


def _new_handle(backend: str, name: str, dtype: torch.dtype, shape: Sequence[int]) -> TensorHandle:
    if dtype not in _DTYPE_NAMES:
        raise TransferError(f"dtype {dtype} cannot be transferred (supported: {', '.join(DTYPES)})")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise TransferError(f"negative dimension in shape {dims}")
    return TensorHandle(backend, name, _DTYPE_NAMES[dtype], dims, math.prod(dims) * dtype.itemsize)


def _validate(
    handle: TensorHandle, backend: str, dtype: torch.dtype | None, shape: ShapePattern | None
) -> tuple[torch.dtype, tuple[int, ...]]:
    """The handle's torch dtype and shape, once they are consistent with each other and the expectations."""
    if handle.backend != backend:
        raise TransferError(f"a {handle.backend!r} handle cannot be opened by the {backend!r} backend")
    actual = DTYPES.get(handle.dtype)
    if actual is None:
        raise TransferError(f"unknown dtype {handle.dtype!r} (supported: {', '.join(DTYPES)})")
    if dtype is not None and actual != dtype:
        raise TransferError(f"dtype mismatch: expected {_DTYPE_NAMES.get(dtype, dtype)}, handle has {handle.dtype}")
    dims = tuple(handle.shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise TransferError(f"bad shape {dims!r}")
    if math.prod(dims) * actual.itemsize != handle.nbytes:
        raise TransferError(f"size mismatch: {handle.dtype}{list(dims)} needs "
                            f"{math.prod(dims) * actual.itemsize} bytes, handle says nbytes={handle.nbytes}")
    if shape is not None and (len(shape) != len(dims) or any(e is not None and e != d for e, d in zip(shape, dims))):
        raise TransferError(f"shape mismatch: expected {tuple(shape)}, handle has {dims}")
    return actual, dims


def _check_size(actual: int, handle: TensorHandle) -> None:
    if actual != handle.nbytes:
        raise TransferError(f"buffer size mismatch: buffer holds {actual} bytes, handle says nbytes={handle.nbytes}")


def _tensor_over(buffer: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over `buffer`, which it keeps alive. Copies only a read-only or misaligned buffer."""
    if buffer.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if buffer.readonly:
        # torch would accept it with a warning, and in-place ops would then write into an immutable object.
        buffer = memoryview(bytearray(buffer))
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def _byte_view(frame: Frame) -> memoryview:
    view = memoryview(frame.buffer if isinstance(frame, zmq.Frame) else frame)
    try:
        return view.cast("B") if view.format != "B" or view.ndim != 1 else view
    except TypeError as e:
        raise TransferError(f"frame is not a contiguous buffer: {e}") from None


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _check_prefix(prefix: str) -> None:
    if not prefix or os.sep in prefix or "\0" in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"bad shared-memory prefix {prefix!r}: it must be a non-empty file name part")


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class ShmTransfer(TransferBackend):
    """Same host: each tensor is a file `{prefix}-{uuid}` in /dev/shm, mapped by sender and receiver.

    Both ends map the file with `torch.from_file`, which keeps no file descriptor: the mapping lives as
    long as the tensor's storage, and a receiver that keeps thousands of embeddings (its encoder cache)
    holds no fd for them (an `mmap.mmap` keeps a dup'd fd per mapping, so P instances ran out of fds).
    The receiver claims a segment by renaming it (atomic: one receiver wins), checks it, maps it and
    unlinks the name; the pages go when the last tensor over them dies.
    """

    name = "shm"

    def __init__(self, prefix: str) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self.directory = shm_dir()

    def _path(self, handle: TensorHandle) -> str:
        name = handle.name
        if handle.backend != self.name or not name.startswith(f"{self.prefix}-") or os.sep in name:
            raise TransferError(f"{handle.backend} handle {name!r} is not a segment of prefix {self.prefix!r}")
        return os.path.join(self.directory, name)

    def allocate(self, dtype: torch.dtype, shape: Sequence[int]) -> tuple[TensorHandle, torch.Tensor]:
        handle, path = self._fill(dtype, shape, _reserve)
        return handle, _map(path, dtype, tuple(handle.shape), handle.nbytes)

    def frames(self, handle: TensorHandle) -> list[Frame]:
        return []

    def export(self, tensor: torch.Tensor) -> tuple[TensorHandle, list[Frame]]:
        """One write(2) of the bytes: about half the CPU of mapping a fresh file and copying into it, whose
        page faults dominate (4.8 MB of 448x448 pixels: 1.1 against 1.9 ms)."""
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        handle, _ = self._fill(tensor.dtype, tensor.shape, lambda fd, nbytes: _write_all(fd, memoryview(data)))
        return handle, []

    def _fill(self, dtype: torch.dtype, shape: Sequence[int],
              fill: Callable[[int, int], None]) -> tuple[TensorHandle, str]:
        """A new segment, filled by `fill(fd, nbytes)`; a failure (a full tmpfs) removes it and raises TransferError."""
        handle = _new_handle(self.name, f"{self.prefix}-{uuid.uuid4().hex}", dtype, shape)
        path = self._path(handle)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | _NOFOLLOW, 0o600)
        try:
            fill(fd, handle.nbytes)
        except OSError as e:
            os.unlink(path)
            raise TransferError(f"cannot allocate {handle.nbytes} bytes in {self.directory}: {e}") from e
        finally:
            os.close(fd)
        return handle, path

    def open(self, handle: TensorHandle, frames: Sequence[Frame] = (), *,
             dtype: torch.dtype | None = None, shape: ShapePattern | None = None) -> torch.Tensor:
        path = _claim(self._path(handle))
        try:  # the segment is ours now: any failure frees it with the name
            torch_dtype, dims = _validate(handle, self.name, dtype, shape)
            _check_size(os.lstat(path).st_size, handle)
            return _map(path, torch_dtype, dims, handle.nbytes)
        finally:
            os.unlink(path)

    def release(self, handle: TensorHandle) -> None:
        try:
            os.unlink(self._path(handle))
        except FileNotFoundError:
            pass


def _map(path: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """A tensor over the file's pages (shared mapping, no fd kept)."""
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8).view(dtype).view(shape)


def _claim(path: str) -> str:
    """Rename a segment to a name only this receiver knows; from then on it is ours alone. Refuses
    anything but a regular file of our own user (a planted symlink or another user's file)."""
    claimed = f"{path}.claimed-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        raise TransferError(f"shm segment {path} is gone (already opened, released or swept)") from None
    st = os.lstat(claimed)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.unlink(claimed)
        raise TransferError(f"shm segment {path} is not a regular file of this user")
    return claimed


def _write_all(fd: int, data: memoryview) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])


def _reserve(fd: int, nbytes: int) -> None:
    """Size the file, claiming its pages now: a full tmpfs raises here instead of SIGBUS on first write."""
    if nbytes and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)
    else:
        os.ftruncate(fd, nbytes)


class ZmqFrameTransfer(TransferBackend):
    """Any host: the tensor's bytes are one raw zmq frame sent beside the control message.

    `frames(handle)` hands the sender's buffer over for sending (call it once); send it with `copy=False`
    to avoid a copy. The receiver should `recv_multipart(copy=False)` and pass the zmq.Frame: its
    buffer is writable, so `open` wraps it without copying (a read-only buffer such as bytes is copied).
    """

    name = "zmq"

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # unused: frames have no names
        self._pending: dict[int, tuple[TensorHandle, torch.Tensor]] = {}  # id(handle) -> raw bytes; names are ""
        self._lock = threading.Lock()

    def allocate(self, dtype: torch.dtype, shape: Sequence[int]) -> tuple[TensorHandle, torch.Tensor]:
        handle = _new_handle(self.name, "", dtype, shape)
        raw = torch.empty(handle.nbytes, dtype=torch.uint8)
        with self._lock:
            self._pending[id(handle)] = (handle, raw)
        return handle, raw.view(dtype).view(handle.shape)

    def frames(self, handle: TensorHandle) -> list[Frame]:
        with self._lock:
            handle_, raw = self._pending.pop(id(handle), (None, None))
        if handle_ is not handle:
            raise TransferError("no pending buffer for this handle (frames() already taken, or released)")
        return [memoryview(raw.numpy())]

    def open(self, handle: TensorHandle, frames: Sequence[Frame] = (), *,
             dtype: torch.dtype | None = None, shape: ShapePattern | None = None) -> torch.Tensor:
        torch_dtype, dims = _validate(handle, self.name, dtype, shape)
        if len(frames) != 1:
            raise TransferError(f"a zmq handle needs exactly 1 frame, got {len(frames)}")
        buffer = _byte_view(frames[0])
        _check_size(buffer.nbytes, handle)
        return _tensor_over(buffer, torch_dtype, dims)

    def release(self, handle: TensorHandle) -> None:
        with self._lock:
            if self._pending.get(id(handle), (None,))[0] is handle:
                del self._pending[id(handle)]


TRANSFER_BACKENDS: dict[str, type[TransferBackend]] = {"shm": ShmTransfer, "zmq": ZmqFrameTransfer}


def make_transfer(name: str, prefix: str) -> TransferBackend:
    if name not in TRANSFER_BACKENDS:
        raise ValueError(f"unknown transfer backend {name!r} (known: {', '.join(TRANSFER_BACKENDS)})")
    return TRANSFER_BACKENDS[name](prefix)


def list_segments(prefix: str) -> list[str]:
    """Names of the shm segments now under `prefix` (tensors in flight, or left behind)."""
    _check_prefix(prefix)
    with os.scandir(shm_dir()) as entries:
        return sorted(e.name for e in entries if e.name.startswith(f"{prefix}-") and e.is_file(follow_symlinks=False))


def sweep_segments(prefix: str) -> list[str]:
    """Unlink every shm segment left under `prefix` (crashed or never-opened transfers); their names."""
    swept = []
    for name in list_segments(prefix):
        try:
            os.unlink(os.path.join(shm_dir(), name))
            swept.append(name)
        except FileNotFoundError:
            pass  # its receiver opened it meanwhile
    return swept

"""Control-plane messages between the router and instance processes, and their codec.

Every message is a frozen dataclass encoded with msgspec (msgpack). A zmq message is
`[kind, payload, *data_frames]`; `kind` picks the type from `MESSAGES`, so a peer can only ever build
these types: nothing on a socket is unpickled. Tensors never travel inside a payload; they move through
the data plane (`runtime.cluster.transfer`) and a `TensorHandle` names them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import torch

from epdlang.sampling import SamplingParams
from runtime.cluster.transfer import TensorHandle
from runtime.messages import GenerateRequest, ImageInput, RequestOutput, TokenLogprob


@dataclass(frozen=True)
class WireImage:
    content_hash: str
    grid_thw: tuple[int, int, int]
    num_tokens: int
    pixels: TensorHandle | None = None  # only when the receiver must run the vision tower on it


@dataclass(frozen=True)
class WireRequest:
    rid: str
    input_ids: tuple[int, ...]
    images: tuple[WireImage, ...] = ()
    sampling: SamplingParams = SamplingParams()
    priority: int = 0
    session_id: str | None = None


_NO_PIXELS = torch.empty(0)


def to_wire(msg: GenerateRequest, pixel_handles: dict[str, Any] | None = None) -> WireRequest:
    handles = pixel_handles or {}
    images = tuple(WireImage(im.content_hash, tuple(im.grid_thw), im.num_tokens, handles.get(im.content_hash))
                   for im in msg.images)
    return WireRequest(msg.rid, tuple(msg.input_ids), images, msg.sampling, msg.priority, msg.session_id)


def from_wire(req: WireRequest, pixels: dict[str, torch.Tensor] | None = None) -> GenerateRequest:
    pixels = pixels or {}
    images = tuple(ImageInput(im.content_hash, pixels.get(im.content_hash, _NO_PIXELS), tuple(im.grid_thw),
                              im.num_tokens) for im in req.images)
    return GenerateRequest(req.rid, tuple(req.input_ids), images, req.sampling, req.priority, req.session_id)


# ---- router -> instance -----------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    """Prefill (and decode, if the instance has D) this request. Embeddings for `incoming` hashes are
    on their way from an E instance; any other missing image the instance asks for with `NeedEncode`."""

    req: WireRequest
    incoming: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncodeJob:
    """Run the vision tower on one image (or find it in the encoder cache). With `dest`, ship the
    embeddings to that instance through the router; without, just keep them cached here."""

    image: WireImage
    dest: str | None = None


@dataclass(frozen=True)
class Embedding:
    content_hash: str
    embeds: TensorHandle


@dataclass(frozen=True)
class Handoff:
    """A prefilled request moving P -> D: its KV for every prompt position and the sampler's state."""

    req: WireRequest
    output_ids: tuple[int, ...]
    kv: TensorHandle  # [2, layers, prompt_len, kv_heads, head_dim]
    cached_tokens: int
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()
    rng_state: bytes | None = None


@dataclass(frozen=True)
class Abort:
    rid: str


@dataclass(frozen=True)
class Control:
    call_id: int
    op: str  # "flush_cache" | "snapshot"


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Peers:
    """Where every ready instance runs (Ray node ids) and its roles: senders pick shm or tcp by it."""

    nodes: dict[str, str]
    roles: dict[str, str]


# ---- instance -> router -----------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    name: str
    pid: int
    node_id: str = ""  # the Ray node it runs on ("" outside Ray)
    address: str = ""  # that node's IP address


@dataclass(frozen=True)
class Outputs:
    outputs: tuple[RequestOutput, ...]


@dataclass(frozen=True)
class Rejected:
    """The instance refused a request at admission; `kind` names the `epdlang.errors` class."""

    rid: str
    kind: str
    message: str


@dataclass(frozen=True)
class EncodeDone:
    content_hash: str
    dest: str | None
    embeds: TensorHandle | None = None
    error: str | None = None


@dataclass(frozen=True)
class NeedEncode:
    rid: str
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class Load:
    """What the router balances on; refreshed by the instance after its steps."""

    waiting: int = 0
    running: int = 0
    encode_queue: int = 0
    free_pages: int = 0
    total_pages: int = 0
    encoder_cache_items: int = 0


@dataclass(frozen=True)
class ControlReply:
    call_id: int
    result: dict[str, Any]
    error: str | None = None


MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (
    Submit, EncodeJob, Embedding, Handoff, Abort, Control, Shutdown, Peers,
    Ready, Outputs, Rejected, EncodeDone, NeedEncode, Load, ControlReply)}

_encoder = msgspec.msgpack.Encoder()
_decoders = {name: msgspec.msgpack.Decoder(cls) for name, cls in MESSAGES.items()}


class WireError(ValueError):
    """A frame that is not one of our messages."""


def encode(msg: Any) -> list[bytes]:
    kind = type(msg).__name__
    if kind not in MESSAGES:
        raise WireError(f"{kind} is not a wire message")
    return [kind.encode(), _encoder.encode(msg)]


def decode(frames: list) -> tuple[Any, list]:
    """(message, extra data frames). Raises WireError for unknown kinds or malformed payloads."""
    if len(frames) < 2:
        raise WireError("a message needs a kind and a payload frame")
    kind = bytes(frames[0]).decode(errors="replace")
    decoder = _decoders.get(kind)
    if decoder is None:
        raise WireError(f"unknown message kind {kind!r}")
    try:
        return decoder.decode(bytes(frames[1])), list(frames[2:])
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed {kind}: {exc}") from exc


def split_frames(handles: list[TensorHandle | None], data: list) -> list[list]:
    """The data frames that belong to each handle, in order (a zmq handle carries one, shm none)."""
    out, i = [], 0
    for handle in handles:
        n = 1 if handle is not None and handle.backend == "zmq" else 0
        out.append(data[i:i + n])
        i += n
    return out


def data_frames(transfer: Any, msg: Any) -> list:
    """The frames to send beside `msg` for the tensor handles it carries."""
    handles = [getattr(msg, name, None) for name in ("kv", "embeds")]
    return [f for h in handles if h is not None for f in transfer.frames(h)]

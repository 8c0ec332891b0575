"""Server settings: one frozen dataclass built from the `epd serve` flags."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.cluster.topology import Topology, parse_topology
from runtime.config import Slo


@dataclass(frozen=True)
class Limits:
    """Per-request bounds. Anything above them is refused with a 4xx before it reaches the engine."""

    max_body_bytes: int = 32 << 20
    max_images: int = 16  # loaded per request, across all messages (uploaded `epd-image:` ids do not count)
    max_image_pixels: int = 4096 * 4096  # width * height of one decoded image
    max_image_bytes: int = 20 << 20  # encoded size of one image (data URL, file or download)
    max_total_tokens: int = 8192  # prompt + max new tokens of one request
    default_max_tokens: int = 256  # when the request does not say
    max_n: int = 16
    max_stop: int = 16
    fetch_timeout_s: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    model_path: str
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    allowed_media_dirs: tuple[Path, ...] = ()
    allow_remote_media: bool = True
    allow_private_media_urls: bool = False  # image URLs resolving to loopback/private addresses
    limits: Limits = field(default_factory=Limits)
    graceful_shutdown_s: float = 30.0
    engine_overrides: dict = field(default_factory=dict)
    topology: Topology = field(default_factory=lambda: parse_topology("EPD"))
    transfer: str = "shm"  # data plane between instances: shm (one host) or zmq (raw frames, any host)
    max_waiting_requests: int | None = None  # beyond it, new requests get 503 + Retry-After
    ray: str | None = None  # a Ray cluster address (or "local") to place the instances on
    slo: Slo = field(default_factory=Slo)  # what --role-switching's planned moves aim for

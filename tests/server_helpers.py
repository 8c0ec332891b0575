"""Helpers for the server tests (the fixture itself is in `server_fixture`)."""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import httpx

from images import image_bytes, make_image

API_KEY = "test-key-123"
LIMITS = {"--max-images": "4", "--max-image-pixels": str(1024 * 1024), "--max-total-tokens": "2048",
          "--max-body-bytes": str(4 << 20), "--max-n": "8"}


@dataclass(frozen=True)
class Server:
    url: str
    api_key: str
    media_dir: Path
    outside_dir: Path
    model: str = "tiny-random"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples plus `name{labels}` keys, as floats."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


def data_url(img=None, fmt: str = "PNG") -> str:
    data = image_bytes(img or make_image("red", (64, 64)), fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode()}"

"""Image sources to decoded RGB images, under the server's media policy.

Sources: `data:` URLs, raw base64 (SGLang), local files (only under allowed directories, after
resolving symlinks and `..`) and http(s) URLs (fetched with a timeout and a size cap). Unless the
server allows it, a URL (or a redirect) whose host resolves to a loopback, private, link-local or
otherwise internal address is refused, so image URLs cannot probe the server's own network.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
from pathlib import Path
from urllib.parse import unquote

import httpx
from PIL import Image

from epdlang.errors import ImageError
from runtime.server.config import Limits
from runtime.server.errors import MediaNotAllowed

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class MediaLoader:
    def __init__(self, limits: Limits, allowed_dirs: tuple[Path, ...], allow_remote: bool,
                 allow_private: bool = False) -> None:
        self.limits, self.allow_remote, self.allow_private = limits, allow_remote, allow_private
        self.allowed_dirs = tuple(Path(d).expanduser().resolve() for d in allowed_dirs)
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def read(self, ref: str, raw_base64: bool = False) -> bytes:
        """The encoded bytes of one image reference. `raw_base64` admits SGLang's bare base64 strings."""
        if not isinstance(ref, str) or not ref:
            raise ImageError("an image reference must be a non-empty string")
        if ref.startswith("data:"):
            return self._b64(ref.partition(",")[2], _data_url_ok(ref))
        if ref.startswith(("http://", "https://")):
            return await self._fetch(ref)
        if raw_base64 and not (ref.startswith("file://") or _looks_like_path(ref)):
            return self._b64(ref, True)
        return self._read_local(ref)

    def decode(self, data: bytes) -> Image.Image:
        """Decode (first frame of a GIF) to RGB, refusing unknown formats and over-large images."""
        try:
            img = Image.open(io.BytesIO(data))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode image: {e}") from e
        if img.format not in FORMATS:
            raise ImageError(f"unsupported image format {img.format}; use png, jpeg, webp or gif")
        w, h = img.size
        if w * h > self.limits.max_image_pixels:
            raise ImageError(f"image is {w}x{h}, over the limit of {self.limits.max_image_pixels} pixels")
        try:
            img.seek(0)
            return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ImageError(f"cannot decode image: {e}") from e

    def _b64(self, payload: str, ok: bool) -> bytes:
        if not ok:
            raise ImageError("data URL must look like data:image/<format>;base64,<data>")
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise ImageError(f"image is over {self.limits.max_image_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"image has invalid base64: {e}") from e

    def _read_local(self, ref: str) -> bytes:
        try:  # ValueError: a NUL byte or a lone surrogate; RuntimeError: an unknown ~user or a symlink loop
            real = Path(unquote(ref.removeprefix("file://"))).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise MediaNotAllowed(f"image path {ref[:200]!r} is not allowed") from e
        if not any(real.is_relative_to(d) for d in self.allowed_dirs):
            raise MediaNotAllowed(f"image path {ref[:200]!r} is not under an allowed media directory")
        try:
            with real.open("rb") as f:
                data = f.read(self.limits.max_image_bytes + 1)
        except OSError as e:
            raise ImageError(f"cannot read image file {ref[:200]!r}: {e.strerror or e}") from e
        if len(data) > self.limits.max_image_bytes:
            raise ImageError(f"image file is over {self.limits.max_image_bytes} bytes")
        return data

    async def _fetch(self, url: str) -> bytes:
        if not self.allow_remote:
            raise MediaNotAllowed("fetching images by http(s) URL is disabled on this server")
        if self._client is None:
            hooks = {} if self.allow_private else {"request": [_refuse_internal_host]}
            self._client = httpx.AsyncClient(timeout=self.limits.fetch_timeout_s, follow_redirects=True,
                                             max_redirects=3, event_hooks=hooks)
        try:  # the timeout bounds the whole download, not only each read (a body can trickle in for ever)
            return await asyncio.wait_for(self._get(url), self.limits.fetch_timeout_s)
        except asyncio.TimeoutError as e:
            raise ImageError(f"fetching image {url[:200]!r} took over {self.limits.fetch_timeout_s:g}s") from e
        except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as e:  # UnicodeError: IDNA cannot encode the host
            raise ImageError(f"cannot fetch image {url[:200]!r}: {type(e).__name__}") from e

    async def _get(self, url: str) -> bytes:
        async with self._client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise ImageError(f"fetching image {url[:200]!r} returned HTTP {resp.status_code}")
            return await self._read_capped(resp)

    async def _read_capped(self, resp: httpx.Response) -> bytes:
        chunks, total = [], 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > self.limits.max_image_bytes:
                raise ImageError(f"image download is over {self.limits.max_image_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


async def _refuse_internal_host(request: httpx.Request) -> None:
    """Runs before every request, redirects included. (A DNS answer that changes between this check
    and the connection is not covered; pin resolution in a proxy if that matters.)"""
    host = request.url.host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, request.url.port or 443)
    except OSError:
        return  # unresolvable: the fetch itself fails with a clear error
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global or addr.is_multicast:
            raise MediaNotAllowed(f"image URL host {host!r} resolves to an internal address ({addr}); "
                                  "this server fetches only public addresses")


def _data_url_ok(url: str) -> bool:
    header = url.partition(",")[0]
    return "," in url and header.startswith("data:image/") and header.endswith(";base64")


def _looks_like_path(ref: str) -> bool:
    return len(ref) < 4096 and ref.lower().endswith(IMAGE_SUFFIXES)

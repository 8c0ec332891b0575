"""Image URLs may not reach the server's own network unless the operator allows it."""
from __future__ import annotations

import asyncio

import pytest

from images import image_bytes, make_image, serve_image
from runtime.server.config import Limits
from runtime.server.errors import MediaNotAllowed
from runtime.server.media import MediaLoader


@pytest.fixture
def local_image_url():
    png = image_bytes(make_image("red", (32, 32)))
    with serve_image(png) as base:
        yield base, png


async def _read(loader: MediaLoader, url: str) -> bytes:
    try:
        return await loader.read(url)
    finally:
        await loader.aclose()


@pytest.mark.parametrize("path", ["/img.png", "/hop"])
def test_internal_addresses_refused_by_default(local_image_url, path):
    """(Offline there is no public host to redirect from; the check runs on every request, redirects too.)"""
    base, _ = local_image_url
    with pytest.raises(MediaNotAllowed, match="internal address"):
        asyncio.run(_read(MediaLoader(Limits(), (), allow_remote=True), base + path))
    localhost = base.replace("127.0.0.1", "localhost")
    with pytest.raises(MediaNotAllowed):
        asyncio.run(_read(MediaLoader(Limits(), (), allow_remote=True), localhost + path))


def test_operator_may_allow_private_urls(local_image_url):
    base, png = local_image_url
    loader = MediaLoader(Limits(), (), allow_remote=True, allow_private=True)
    assert asyncio.run(_read(loader, base + "/hop")) == png

"""The fuzz mode, bounded: about 300 schemathesis cases (seeded) plus the whole hostile corpus against a launched
`epd serve tiny` (E,P,D, the fuzz mode's own small limits): no 5xx, no crash, healthy after. Plus the schema
it fuzzes from, and regressions for what it found that need no server."""
from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from benchmarks.reliability import fuzz, image_host
from benchmarks.reliability.hostile import dumps
from benchmarks.serving.launch import launched
from epdlang.errors import ImageError
from runtime.server.app import create_app
from runtime.server.config import Limits, ServerConfig
from runtime.server.errors import MediaNotAllowed
from runtime.server.media import MediaLoader
from runtime.server.openai_protocol import ChatCompletionRequest
from runtime.server.sglang_protocol import SglSampling

POST_ROUTES = {"/v1/chat/completions", "/v1/completions", "/generate", "/tokenize", "/epd/images", "/epd/end_session"}
GENERATED = 300


@pytest.mark.timeout(600)  # ~60 s alone on 2 cores; generous for a busy machine, still bounded
def test_fuzz_finds_no_server_error(tmp_path):
    with launched("E,P,D", "tiny-random", fuzz.SERVE_ARGS, tmp_path) as url:
        report = fuzz.fuzz(url, 0, seed=0, generated=GENERATED, request_timeout_s=30, time_limit_s=480)
    assert report["server_errors"] == [] and report["crashes"] == [] and report["bad_error_bodies"] == []
    assert report["healthy_after"] and report["ok"] and report["stopped_early"] is None
    assert report["generated"] >= GENERATED * 0.9 and report["hostile"] > 1000
    assert report["requests"] == report["generated"] + report["hostile"]
    assert all(s.isdigit() and (200 <= int(s) < 300 or 400 <= int(s) < 500) for s in report["by_status"])


def schema() -> dict:
    return create_app(ServerConfig(model_path="tiny-random", served_model_name="tiny-random")).openapi()


def test_schema_describes_every_post_body():
    paths = schema()["paths"]
    posts = {p for p, ops in paths.items() if "post" in ops and "requestBody" in ops["post"]}
    assert posts == POST_ROUTES
    chat = paths["/v1/chat/completions"]["post"]["requestBody"]
    assert chat["required"] and "$ref" not in str(chat)  # the models' $defs are inlined
    body = chat["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "messages"]
    part = body["properties"]["messages"]["items"]["properties"]["content"]["anyOf"][1]["items"]
    assert part["properties"]["type"]["enum"] == ["text", "image_url"]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(ids) == len(set(ids))  # GET and POST /flush_cache are two operations


def test_wire_ints_are_bounded():
    """Ints wider than 64 bits used to reach the engine's msgpack encoder, whose failure left the request
    hanging for ever (`top_k`, `seed`, `stop_token_ids` on both APIs)."""
    for bad in ({"top_k": 10**30}, {"seed": 2**64}, {"seed": -(2**63) - 1}, {"stop_token_ids": [2**63]}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate_json(dumps({"model": "m", "messages": [{"role": "user"}]} | bad),
                                                      strict=True)
    for bad in ({"top_k": 2**63}, {"sampling_seed": 2**64}, {"stop_token_ids": [2**64]}):
        with pytest.raises(ValidationError):
            SglSampling.model_validate_json(dumps(bad), strict=True)
    ok = ChatCompletionRequest.model_validate_json(dumps({"model": "m", "messages": [{"role": "user"}],
                                                          "seed": 2**63 - 1, "top_k": 2**31}), strict=True)
    assert ok.seed == 2**63 - 1


def read(loader: MediaLoader, ref: str, raw_base64: bool = False) -> bytes:
    async def go() -> bytes:
        try:
            return await loader.read(ref, raw_base64)
        finally:
            await loader.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("ref", ["/tmp/x\x00.png", "file:///tmp/x%00.png", "/tmp/\ud800.png", "~nosuchuser/x.png"])
def test_unreadable_paths_are_refused_not_crashes(tmp_path, ref):
    """A NUL byte, a lone surrogate or an unknown ~user used to escape as ValueError/RuntimeError: a 500."""
    with pytest.raises(MediaNotAllowed):
        read(MediaLoader(Limits(), (tmp_path,), allow_remote=True), ref, raw_base64=True)


@pytest.mark.parametrize("url", ["http://[::1", "http://\x00/x.png", "http://\t/x.png", "http://xn--/x.png",
                                 f"http://{'a' * 300}.com/x.png", "https://\u3002/x.png", f"http://{'x' * 70_000}/"])
def test_malformed_urls_are_image_errors(url):
    """httpx.InvalidURL and IDNA's UnicodeError are not httpx.HTTPError; they used to become 500s."""
    with pytest.raises(ImageError, match="cannot fetch image"):
        read(MediaLoader(Limits(), (), allow_remote=True, allow_private=True), url)


def test_fetch_timeout_bounds_the_whole_download():
    """A body trickling in one byte per half second used to keep the request for as long as it trickled
    (httpx's timeout is per read): `--fetch-timeout` is now the whole download's."""
    with image_host.image_host() as base:
        t0 = time.monotonic()
        with pytest.raises(ImageError, match="took over 1s"):
            read(MediaLoader(Limits(fetch_timeout_s=1.0), (), allow_remote=True, allow_private=True), f"{base}/slow")
        assert time.monotonic() - t0 < 3.0

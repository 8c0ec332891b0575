"""Hundreds of malformed requests: each gets a 4xx with an OpenAI-style error body, the server keeps
serving, /metrics counts them. Plus auth, the local-media policy and the body-size cap."""
from __future__ import annotations

import base64
import itertools
import os
import random

import httpx
import pytest

from images import image_bytes, make_image
from server_helpers import data_url

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.timeout(150)

CHAT, GEN, COMP = "/v1/chat/completions", "/generate", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat_body(**kw) -> dict:
    return {"model": "tiny-random", "messages": USER, "max_tokens": 4} | kw


def img_msg(*urls: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def malformed_cases() -> list[tuple[str, bytes | dict]]:
    """(path, body): raw bytes are sent as-is, dicts as JSON."""
    rng = random.Random(0)
    raw = [b"", b"{", b"[]", b"null", b"42", b'"x"', b"{\"model\": }", b"\xff\xfe\x00", b"{'a': 1}"]
    raw += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(12)]
    cases: list = [(p, b) for p in (CHAT, COMP, GEN) for b in raw]
    wrong = {"temperature": ["hot", [1], {"a": 1}, True], "max_tokens": ["5", 1.5, -1, 0, 10**9],
             "n": [0, -3, 1000, "2"], "top_p": [0, 2, -1.0, "x"], "top_k": [0, -5, 1.5, 2**63, 10**30],
             "min_p": [-0.1, 3], "presence_penalty": [9, -9], "frequency_penalty": [3.5],
             "repetition_penalty": [0, -1, 100], "stop": [5, [1, 2], [""], ["s"] * 40],
             "seed": ["x", 1.5, 2**64, -(2**63) - 1], "logprobs": ["yes", 3], "top_logprobs": [50, -1],
             "stream": ["yes", 1],
             "messages": [[], "hi", [{"role": "nobody", "content": "x"}], [{"content": "x"}],
                          [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "video"}]}],
                          [{"role": "user", "content": [{"type": "text"}]}]],
             "model": ["nope", 5, None], "response_format": [{"type": "xml"}, {"type": "json_schema"}, "json"],
             "regex": ["((", "[z-a]", "(?<=x)y"], "logit_bias": [{"1": 5}], "tools": [[{"type": "function"}]],
             "stop_token_ids": [[-1], ["a"], [2**64]], "min_tokens": [-2, 100]}
    for field, values in wrong.items():
        cases += [(CHAT, chat_body(**{field: v})) for v in values]
    cases += [(CHAT, chat_body(response_format={"type": "json_schema", "json_schema": {"schema": s}}))
              for s in ({"type": "nonsense"}, {"type": "object", "properties": 5}, {"$ref": "#/nope"})]
    cases += [(CHAT, chat_body(messages=img_msg(u))) for u in image_cases()]
    cases += [(CHAT, chat_body(messages=img_msg(*[data_url()] * 5)))]
    cases += [(CHAT, chat_body(messages=[{"role": "user", "content": "word " * 3000}]))]
    m = {"model": "tiny-random"}
    cases += [(COMP, m | b) for b in ({"prompt": []}, {"prompt": [-1]}, {"prompt": [[1], ["a"]]}, {"prompt": 5},
                                      {"prompt": "x", "echo": True}, {"prompt": [10**9]},
                                      {"prompt": "x", "logprobs": 99})]
    cases += [(COMP, {"prompt": "x"})]
    cases += [(GEN, b) for b in sglang_cases()]
    return cases


def image_cases() -> list[str]:
    junk = base64.b64encode(b"not an image at all").decode()
    big = base64.b64encode(image_bytes(make_image("red", (2048, 1024)))).decode()
    bmp = base64.b64encode(image_bytes(make_image("red", (32, 32)), "BMP")).decode()
    return [f"data:image/png;base64,{junk}", "data:image/png;base64,!!!!", "data:text/plain;base64,aGk=",
            "data:image/png,notbase64", f"data:image/png;base64,{big}", f"data:image/bmp;base64,{bmp}",
            "/etc/passwd", "file:///etc/hostname", "../../../../etc/passwd", "ftp://example.com/x.png",
            "http://127.0.0.1:1/none.png", "", *fuzz_found_refs()]


def fuzz_found_refs() -> list[str]:
    """Refs the fuzz mode found 500s with: a NUL or an unknown ~user in a path (ValueError, RuntimeError), URLs
    that httpx or IDNA refuse before any request (InvalidURL, UnicodeError)."""
    return ["/tmp/x\x00.png", "file:///tmp/x%00.png", "~nosuchuser/x.png", "http://[::1", "http://\x00/x.png",
            "http://\t/x.png", "http://xn--/x.png", f"http://{'a' * 300}.com/x.png"]


def sglang_cases() -> list[dict]:
    ok = {"max_new_tokens": 2}
    return [{}, {"text": "a", "input_ids": [1]}, {"text": ""}, {"text": []}, {"input_ids": []},
            {"input_ids": [-1]}, {"input_ids": [10**9]}, {"input_ids": ["a"]}, {"text": 5},
            {"text": "a", "sampling_params": {"bogus": 1}}, {"text": "a", "sampling_params": {"max_new_tokens": -1}},
            {"text": "a", "sampling_params": {"max_new_tokens": 10**8}},
            {"text": "a", "sampling_params": {"temperature": -1}}, {"text": "a", "sampling_params": {"top_k": 0}},
            {"text": "a", "sampling_params": {"regex": "(("}}, {"text": "a", "sampling_params": {"json_schema": "{"}},
            {"text": "a", "sampling_params": {"regex": "a", "json_schema": "{}"}},
            {"text": "a", "sampling_params": {"ebnf": "root ::= 'a'"}},
            {"text": "a", "sampling_params": ok, "return_logprob": True, "logprob_start_len": 50},
            {"text": "a", "sampling_params": ok, "top_logprobs_num": 99, "return_logprob": True},
            {"text": ["a", "b"], "sampling_params": [ok]}, {"text": ["a", "b"], "rid": ["x"]},
            {"text": "a", "image_data": "bm90IGFuIGltYWdl"}, {"text": "<|image_pad|>", "image_data": "!!"},
            {"text": "a <|image_pad|>", "image_data": ["/etc/passwd.png"]},
            {"text": "no pads", "image_data": data_url()},
            {"text": "a", "sampling_params": {"n": 0}}, {"text": "a", "sampling_params": {"stop": [3]}},
            # ints past 64 bits used to hang the request (the engine's msgpack encoder failed in the router)
            {"text": "a", "sampling_params": {"top_k": 10**30}},
            {"text": "a", "sampling_params": {"sampling_seed": 2**64}},
            {"text": "a", "sampling_params": {"stop_token_ids": [2**64]}},
            {"text": "a <|image_pad|>", "image_data": "http://[::1"},
            {"text": "a <|image_pad|>", "image_data": "/x\x00.png"}]


def assert_error(r: httpx.Response, case) -> None:
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), case


def send(c: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return c.post(path, content=body, headers={"content-type": "application/json"})
    return c.post(path, json=body)


def test_malformed_requests_get_4xx_and_server_survives(server):
    cases = malformed_cases()
    repeats = max(1, 300 // len(cases) + 1)
    assert len(cases) * repeats >= 300
    before = server.metrics()
    with server.client(timeout=30) as c:
        for path, body in itertools.chain.from_iterable([cases] * repeats):
            assert_error(send(c, path, body), (path, str(body)[:200]))
        good = c.post(CHAT, json=chat_body(temperature=0, max_tokens=5)).json()
        assert good["choices"][0]["message"]["content"] and good["usage"]["completion_tokens"] <= 5
        assert c.get("/health").status_code == 200
    after = server.metrics()
    counted = sum(v - before.get(k, 0.0) for k, v in after.items()
                  if k.startswith("epd_http_requests_total") and 'status="4' in k)
    assert counted >= len(cases) * repeats
    assert after["epd_num_running_requests"] == 0


def test_auth(server):
    body = chat_body()
    assert httpx.post(server.url + CHAT, json=body).status_code == 401
    bad = httpx.post(server.url + CHAT, json=body, headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/generate").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.post(server.url + CHAT, json=body, headers=server.headers).status_code == 200


def test_local_media_policy(server):
    png = image_bytes(make_image("red", (64, 64)))
    inside, outside = server.media_dir / "red.png", server.outside_dir / "secret.png"
    inside.write_bytes(png)
    outside.write_bytes(png)
    link = server.media_dir / "link.png"
    if not link.exists():
        os.symlink(outside, link)
    with server.client() as c:
        for url in (str(outside), f"file://{outside}", str(link), f"{server.media_dir}/../outside/secret.png"):
            r = c.post(CHAT, json=chat_body(messages=img_msg(url)))
            assert r.status_code == 403 and r.json()["error"]["code"] == "media_not_allowed", url
        for url in (str(inside), f"file://{inside}"):
            assert c.post(CHAT, json=chat_body(messages=img_msg(url))).status_code == 200, url


def test_body_size_cap(server):
    r = httpx.post(server.url + CHAT, headers=server.headers | {"content-type": "application/json"},
                   content=b"{" + b" " * (5 << 20) + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

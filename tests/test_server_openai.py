"""The OpenAI-compatible API through the official `openai` client, against a real `epd serve tiny`."""
from __future__ import annotations

import asyncio
import base64
import json
import re

import openai
import pytest

from images import image_bytes, make_gif, make_image, serve_image
from server_helpers import data_url

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.timeout(120)

USER = [{"role": "user", "content": "Say something about Python."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


def chat(client, messages=USER, **kw):
    kw = {"max_tokens": 8, "temperature": 0} | kw
    return client.chat.completions.create(model="tiny-random", messages=messages, **kw)


def image_message(*urls: str, text: str = "Describe the images.") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


def test_chat_sync(client):
    r = chat(client)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens >= 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_async_concurrent_greedy_is_deterministic(server):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0) as c:
            return await asyncio.gather(*(c.chat.completions.create(
                model="tiny-random", messages=USER, max_tokens=8, temperature=0) for _ in range(3)))
    texts = {r.choices[0].message.content for r in asyncio.run(run())}
    assert len(texts) == 1


def test_chat_stream_matches_non_stream(client):
    full = chat(client, max_tokens=10).choices[0].message.content
    chunks = list(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1


def test_images_data_urls_multi_image_and_turns(client):
    red, blue = data_url(make_image("red", (64, 64))), data_url(make_image("blue", (56, 84)), "JPEG")
    text_only = chat(client, [{"role": "user", "content": "Describe the images."}])
    one = chat(client, [image_message(red)])
    two = chat(client, [image_message(red, blue)])
    assert text_only.usage.prompt_tokens < one.usage.prompt_tokens < two.usage.prompt_tokens
    turns = [image_message(red, blue), {"role": "assistant", "content": two.choices[0].message.content},
             image_message(data_url(make_image("green", (64, 64)), "WEBP"), text="And this one?")]
    three = chat(client, turns)
    assert three.usage.prompt_tokens > two.usage.prompt_tokens
    assert chat(client, [image_message(red, blue)]).choices[0].message.content == two.choices[0].message.content


def test_gif_first_frame(client):
    gif = "data:image/gif;base64," + base64.b64encode(make_gif(("red", "blue"), (64, 64))).decode()
    red = data_url(make_image("red", (64, 64)))
    assert chat(client, [image_message(gif)]).choices[0].message.content == \
        chat(client, [image_message(red)]).choices[0].message.content


def test_http_image_url(client):
    with serve_image(image_bytes(make_image("red", (64, 64)))) as base:
        by_url = chat(client, [image_message(f"{base}/red.png")]).choices[0].message.content
    assert by_url == chat(client, [image_message(data_url(make_image("red", (64, 64))))]).choices[0].message.content


def test_multi_turn_cached_tokens(client):
    first = chat(client, [{"role": "system", "content": "You are terse. " * 8}, *USER], max_tokens=6)
    turns = [{"role": "system", "content": "You are terse. " * 8}, *USER,
             {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And more?"}]
    second = chat(client, turns, max_tokens=6)
    if second.usage.prompt_tokens_details.cached_tokens == 0:
        pytest.xfail("the engine's prefix cache has not landed: cached_tokens is 0 on the second turn")
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_n2_with_seed(client):
    r = chat(client, n=2, temperature=1.0, seed=7, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    again = chat(client, n=2, temperature=1.0, seed=7, max_tokens=6)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert r.usage.completion_tokens == 12 or all(c.finish_reason == "stop" for c in r.choices)


def test_stop_string(client):
    full = chat(client, max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    r = chat(client, max_tokens=12, stop=[stop])
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.message.content and full.startswith(choice.message.content)


def test_logprobs(client):
    r = chat(client, logprobs=True, top_logprobs=3, max_tokens=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    assert "".join(e.token for e in content) == r.choices[0].message.content


SHAPE = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
         "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                        "count": {"type": "integer"}}}


def test_json_output_is_compact_and_ends_within_40_tokens(client):
    """Compact whitespace by default: with flexible whitespace the random-weight model pads with spaces
    and newlines until max_tokens runs out, and the JSON never closes. (json_object is compact too, see
    test_grammar; its free-form keys can run on with a random model, so it is not held to 40 tokens.)"""
    spec = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}
    r = chat(client, max_tokens=40, response_format=spec)
    text = r.choices[0].message.content
    obj = json.loads(text)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 40
    assert text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert set(obj) == {"color", "count"} and obj["color"] in ("red", "green", "blue")
    assert isinstance(obj["count"], int)


def test_x_guidance_allows_flexible_whitespace_per_request(client):
    spec = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE}}
    r = chat(client, max_tokens=40, response_format=spec, extra_body={"x-guidance": {"whitespace_flexible": True}})
    text = r.choices[0].message.content
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        json.loads(text)
    compact = chat(client, max_tokens=40, response_format=spec)
    assert text != compact.choices[0].message.content  # the same greedy request, but whitespace was allowed


def test_regex_extension(client):
    r = chat(client, max_tokens=16, extra_body={"regex": "(yes|no)[0-9]{2}"})
    assert re.fullmatch("(yes|no)[0-9]{2}", r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"


def test_completions(client):
    r = client.completions.create(model="tiny-random", prompt=["def f(x):", "import os"], max_tokens=5,
                                  temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) <= 5
        assert "".join(c.logprobs.tokens) == c.text
    streamed = client.completions.create(model="tiny-random", prompt="def f(x):", max_tokens=5, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text

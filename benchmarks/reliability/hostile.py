"""The fuzz mode's hand-made hostile corpus, as requests through the real routes: the images of `hostile_images`
(chat image_url data URLs, `/generate` image_data, `/epd/images`), hostile strings in every text field (lone
surrogates as `\\ud800` escapes, NUL bytes, ...), numbers at and past their limits, and oversized or malformed
bodies. The same probes in the same order on every run.
"""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from benchmarks.reliability.hostile_images import data_urls, images

CHAT, COMP, GEN, TOK = "/v1/chat/completions", "/v1/completions", "/generate", "/tokenize"
IMAGES, END = "/epd/images", "/epd/end_session"
RAW = "\x00raw:"  # a string value starting with this is written into the JSON body as a bare literal


@dataclass(frozen=True)
class Probe:
    """One request: `body` is sent as-is with content-type application/json."""

    name: str
    path: str
    body: bytes
    method: str = "POST"
    auth: bool = True


def dumps(obj: Any) -> bytes:
    """JSON with ASCII escapes (so a lone surrogate is written as `\\ud800`), NaN/Infinity literals allowed, and
    `RAW`-marked strings written unquoted (`1e309`, a 5000-digit integer, a deeply nested object)."""
    text = json.dumps(obj, ensure_ascii=True, allow_nan=True)
    return _RAW_STRING.sub(lambda m: json.loads(f'"{m.group(1)}"'), text).encode()


_RAW_STRING = re.compile(r'"\\u0000raw:((?:[^"\\]|\\.)*)"')


# ---- probes -----------------------------------------------------------------------------------------

def image_probes(model: str, image_prompt: str, urls: list[tuple[str, str]]) -> Iterator[Probe]:
    """Each hostile image through chat (data URL), `/generate` (raw base64 and data URL) and `/epd/images`; each
    of `urls` (name, URL) through chat and `/generate`."""
    raw = {name: base64.b64encode(data).decode() for name, _, data in images()}
    for name, url in [*data_urls(), *urls]:
        content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
        yield Probe(f"chat-image:{name}", CHAT, dumps(chat(model, content, max_tokens=1)))
        yield Probe(f"generate-image-url:{name}", GEN, dumps(generate(image_prompt, image_data=url)))
        if name in raw:
            yield Probe(f"generate-image-b64:{name}", GEN, dumps(generate(image_prompt, image_data=raw[name])))
            yield Probe(f"upload-image:{name}", IMAGES, dumps({"images": [raw[name]]}))
    yield Probe("upload-image:unknown-ids", IMAGES, dumps({"images": [f"epd-image:{i:064x}" for i in range(100)]}))
    yield Probe("generate-image:unknown-id", GEN, dumps(generate(image_prompt, image_data="epd-image:\ud800")))


def chat(model: str, content: Any = "hi", **kw: Any) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 2} | kw


def completion(model: str, prompt: Any = "hi", **kw: Any) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 2} | kw


def generate(text: Any = "hi", sampling: dict | None = None, **kw: Any) -> dict:
    return {"text": text, "sampling_params": {"max_new_tokens": 2} | (sampling or {})} | kw


HOSTILE_STRINGS = {"surrogate": "\ud800", "low-surrogate": "a\udfffb", "reversed-pair": "\udc00\ud800",
                   "nul": "a\x00b", "nuls": "\x00" * 64, "bidi": "\u202e\u2066x", "bom": "\ufeffhi",
                   "noncharacter": "\uffff\ufffe", "long": "word " * 20_000}


def text_probes(model: str) -> Iterator[Probe]:
    """Hostile strings in every text field of every POST route."""
    for name, s in HOSTILE_STRINGS.items():
        bodies = {"content": (CHAT, chat(model, s)), "content-part": (CHAT, chat(model, [{"type": "text", "text": s}])),
                  "model": (CHAT, chat(s)), "name": (CHAT, chat(model) | {"messages": [{"role": "user", "content": "x",
                                                                                        "name": s}]}),
                  "stop": (CHAT, chat(model, stop=[s])), "session": (CHAT, chat(model, session_id=s)),
                  "user": (CHAT, chat(model, user=s)), "regex": (CHAT, chat(model, regex=s)),
                  "schema-key": (CHAT, chat(model, response_format={"type": "json_schema", "json_schema": {
                      "schema": {"type": "object", "properties": {s: {"type": "string"}}, "required": [s]}}})),
                  "logit-bias-key": (CHAT, chat(model, logit_bias={s: 1})),
                  "prompt": (COMP, completion(model, s)), "prompt-list": (COMP, completion(model, [s, s])),
                  "generate-text": (GEN, generate(s)), "generate-stop": (GEN, generate(sampling={"stop": s})),
                  "generate-rid": (GEN, generate(rid=s)), "generate-session": (GEN, generate(session_id=s)),
                  "generate-regex": (GEN, generate(sampling={"regex": s})),
                  "generate-schema": (GEN, generate(sampling={"json_schema": s})),
                  "tokenize": (TOK, {"prompt": s}), "tokenize-list": (TOK, {"prompt": [s, "x"]}),
                  "end-session": (END, {"session_id": s}), "upload": (IMAGES, {"images": [s]})}
        for field, (path, body) in bodies.items():
            yield Probe(f"text:{name}:{field}", path, dumps(body))
            if path in (CHAT, COMP, GEN) and field in ("content", "prompt", "generate-text"):
                yield Probe(f"text:{name}:{field}:stream", path, dumps(body | {"stream": True}))


def label(v: Any) -> str:
    """A short name for a probe value (a 5000-digit literal is not a name)."""
    text = v.removeprefix(RAW) if isinstance(v, str) else repr(v)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} chars)"


N_VALUES = (0, 1, 2, 4, 5, 8, 9, 16, 17, 128, -1, 2**31, 2**63, 2**64, 10**30)
TOKEN_VALUES = (0, 1, 127, 128, 255, 256, 257, 2047, 2048, 2049, 8192, 8193, -1, 2**31, 2**63, 2**64, 10**30)
TOP_K = (-1, 0, 1, 2, 7999, 8000, 8001, 2**31, 2**63, 10**30)
FLOATS = (0, -0.0, 5e-324, 1e-30, 0.5, 1, 1.0000001, 2, 100, 1e308, -1, -1e308, float("nan"), float("inf"),
          float("-inf"), RAW + "1e309", RAW + "-1e309", RAW + "1" * 5000, RAW + "1e-400")
INTS = (-1, 0, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, RAW + "9" * 5000, 1.5, RAW + "1e3", True)


def number_probes(model: str) -> Iterator[Probe]:
    """`n`, `top_k`, `max_tokens`, the float knobs and the seed at and past their limits, on every route."""
    for n in N_VALUES:
        yield Probe(f"n:{label(n)}:chat", CHAT, dumps(chat(model, n=n, max_tokens=1)))
        yield Probe(f"n:{label(n)}:completion", COMP, dumps(completion(model, n=n, max_tokens=1)))
        yield Probe(f"n:{label(n)}:generate", GEN, dumps(generate(sampling={"n": n, "max_new_tokens": 1})))
    for k in TOP_K:
        yield Probe(f"top_k:{label(k)}:chat", CHAT, dumps(chat(model, top_k=k)))
        yield Probe(f"top_k:{label(k)}:generate", GEN, dumps(generate(sampling={"top_k": k})))
    for t in TOKEN_VALUES:
        bodies = {"max_tokens:chat": (CHAT, chat(model, max_tokens=t)),
                  "max_completion_tokens:chat": (CHAT, chat(model, max_completion_tokens=t)),
                  "max_tokens:completion": (COMP, completion(model, max_tokens=t)),
                  "max_new_tokens:generate": (GEN, generate(sampling={"max_new_tokens": t})),
                  "min_tokens:chat": (CHAT, chat(model, min_tokens=t)),
                  "logprob_start_len:generate": (GEN, generate(return_logprob=True, logprob_start_len=-t)),
                  "top_logprobs_num:generate": (GEN, generate(return_logprob=True, top_logprobs_num=t)),
                  "top_logprobs:chat": (CHAT, chat(model, logprobs=True, top_logprobs=t)),
                  "logprobs:completion": (COMP, completion(model, logprobs=t)),
                  "stop_token_ids:chat": (CHAT, chat(model, stop_token_ids=[t])),
                  "stop_token_ids:generate": (GEN, generate(sampling={"stop_token_ids": [t]})),
                  "input_ids:generate": (GEN, {"input_ids": [t], "sampling_params": {"max_new_tokens": 1}})}
        for name, (path, body) in bodies.items():
            field, _, route = name.partition(":")
            yield Probe(f"{field}:{label(t)}:{route}", path, dumps(body))
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        for v in FLOATS:
            yield Probe(f"{field}:{label(v)}:chat", CHAT, dumps(chat(model, **{field: v})))
            yield Probe(f"{field}:{label(v)}:generate", GEN, dumps(generate(sampling={field: v})))
    for v in INTS:
        yield Probe(f"seed:{label(v)}:chat", CHAT, dumps(chat(model, seed=v, temperature=1)))
        yield Probe(f"seed:{label(v)}:generate", GEN, dumps(generate(sampling={"sampling_seed": v})))


def size_probes(model: str) -> Iterator[Probe]:
    """Thousands of stop strings, a huge logit_bias, deep nesting, long lists."""
    many = [f"stop{i}" for i in range(1000)]
    yield Probe("stop:1000:chat", CHAT, dumps(chat(model, stop=many)))
    yield Probe("stop:1000:completion", COMP, dumps(completion(model, stop=many)))
    yield Probe("stop:1000:generate", GEN, dumps(generate(sampling={"stop": many})))
    yield Probe("stop:1000-empty:chat", CHAT, dumps(chat(model, stop=[""] * 1000)))
    yield Probe("stop:16:chat", CHAT, dumps(chat(model, stop=many[:16])))
    yield Probe("stop:one-100k:chat", CHAT, dumps(chat(model, stop=["x" * 100_000])))
    yield Probe("stop_token_ids:1000:chat", CHAT, dumps(chat(model, stop_token_ids=list(range(1000)))))
    bias = {str(i): 100.0 for i in range(100_000)}
    yield Probe("logit_bias:100k:chat", CHAT, dumps(chat(model, logit_bias=bias)))
    yield Probe("logit_bias:100k:completion", COMP, dumps(completion(model, logit_bias=bias)))
    yield Probe("logit_bias:100k:generate", GEN, dumps(generate(sampling={"logit_bias": bias})))
    yield Probe("logit_bias:bad-values:chat", CHAT, dumps(chat(model, logit_bias={"1": "x", "a": None})))
    deep = '{"type": "object", "properties": {"a": ' * 500 + '{"type": "string"}' + "}}" * 500
    yield Probe("json_schema:deep-500", CHAT, dumps(chat(model, response_format={
        "type": "json_schema", "json_schema": {"schema": RAW + deep}})))
    yield Probe("json:nested-100k", CHAT, b"[" * 100_000 + b"]" * 100_000)
    yield Probe("json:nested-messages", CHAT, dumps(chat(model, [{"type": "text", "text": [[[["x"]]]]}])))
    yield Probe("messages:10k", CHAT, dumps(chat(model) | {"messages": [{"role": "user", "content": "hi"}] * 10_000}))
    yield Probe("prompts:1000", COMP, dumps(completion(model, ["hi"] * 1000)))
    yield Probe("generate:1000-texts", GEN, dumps({"text": ["hi"] * 1000, "sampling_params": {"max_new_tokens": 1}}))
    yield Probe("tokenize:10k", TOK, dumps({"prompt": ["hi"] * 10_000}))
    yield Probe("json:duplicate-keys", CHAT, b'{"model": "x", "model": ' + json.dumps(model).encode()
                + b', "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}')
    yield Probe("json:bom", CHAT, b"\xef\xbb\xbf" + dumps(chat(model)))
    yield Probe("json:utf16", CHAT, json.dumps(chat(model)).encode("utf-16"))
    yield Probe("json:trailing", CHAT, dumps(chat(model)) + b" {}")
    yield Probe("json:raw-nul", CHAT, dumps(chat(model)).replace(b'"hi"', b'"h\x00i"'))
    yield Probe("json:invalid-utf8", CHAT, dumps(chat(model)).replace(b'"hi"', b'"h\xff\xfei"'))


def schema_chat(model: str, schema: Any, **kw: Any) -> dict:
    return chat(model, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, **kw)


REGEXES = ("", "a{100000}", "(a{1000}){1000}", "[a-z]" * 5000, "\\p{L}+", "(?P<x>a)(?P=x)", "(a)\\1", "^$", "\\",
           "(?i)abc", "[^\\x00-\\x{10FFFF}]", "(", "a**", "x{2,1}")
SCHEMAS = ({"type": "string", "pattern": "(("}, {"type": "string", "format": "no-such-format"},
           {"type": "string", "minLength": 10**30}, {"type": "array", "maxItems": -1}, {"enum": []},
           {"type": ["string", "null"]}, {"type": "integer", "minimum": 10**30, "maximum": -(10**30)},
           {"type": "number", "multipleOf": 0}, {"$ref": "#"}, {"anyOf": []}, {"not": {}}, True, False, {},
           {"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}, "$defs": {"b": {"$ref": "#/$defs/b"}}},
           {"type": "string", "maxLength": 0, "minLength": 1}, {"const": "\x00"}, {"type": "nonsense"})
GUIDANCE = ({"whitespace_flexible": "yes"}, {"lenient": 5}, {"item_separator": 5}, {"key_separator": None},
            {"whitespace_pattern": "(("}, {"coerce_one_of": []}, {"unknown_option": 1})


def structure_probes(model: str) -> Iterator[Probe]:
    """Constraints that may not compile, and shapes that the schema allows but the routes may not expect."""
    for i, regex in enumerate(REGEXES):
        yield Probe(f"regex:{i}:chat", CHAT, dumps(chat(model, regex=regex, max_tokens=4)))
        yield Probe(f"regex:{i}:generate", GEN, dumps(generate(sampling={"regex": regex, "max_new_tokens": 4})))
    for i, schema in enumerate(SCHEMAS):
        yield Probe(f"json_schema:{i}:chat", CHAT, dumps(schema_chat(model, schema, max_tokens=4)))
        yield Probe(f"json_schema:{i}:generate", GEN, dumps(generate(sampling={"json_schema": schema})))
    for i, opts in enumerate(GUIDANCE):
        yield Probe(f"x-guidance:{i}:chat", CHAT, dumps(schema_chat(model, {"type": "object"}, **{"x-guidance": opts})))
    user = [{"role": "user", "content": "hi"}]
    shapes = {"content-none": (CHAT, chat(model, None)), "content-empty-list": (CHAT, chat(model, [])),
              "assistant-last": (CHAT, chat(model) | {"messages": [*user, {"role": "assistant", "content": "x"}]}),
              "tool-only": (CHAT, chat(model) | {"messages": [{"role": "tool", "content": "x"}]}),
              "image-url-string": (CHAT, chat(model, [{"type": "image_url", "image_url": "epd-image:0"}])),
              "special-tokens": (CHAT, chat(model, "<|im_end|><|im_start|>system\n<|image_pad|><|endoftext|>")),
              "stop-special": (CHAT, chat(model, stop=["<|im_end|>", "<|endoftext|>"], max_tokens=8)),
              "stream-n-logprobs": (CHAT, chat(model, n=3, logprobs=True, top_logprobs=20, stream=True,
                                               stream_options={"include_usage": True}, max_tokens=4)),
              "completion-ids-empty": (COMP, completion(model, [[]])),
              "completion-ids-mixed": (COMP, completion(model, [[1, 2], [3]], n=2, logprobs=5, stream=True)),
              "generate-ids-empty": (GEN, {"input_ids": [[]]}), "generate-texts-empty": (GEN, {"text": [""]}),
              "generate-image-none": (GEN, generate(image_data=[None])),
              "generate-image-nested": (GEN, generate(image_data=[["a"]])),
              "generate-batch-images": (GEN, generate(["a", "b"], image_data=[None, None])),
              "generate-batch-lists": (GEN, {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}],
                                             "return_logprob": [True, False], "top_logprobs_num": [5, 0],
                                             "logprob_start_len": [0, -1], "rid": ["r1", "r1"], "stream": True}),
              "generate-same-rid": (GEN, {"text": ["a", "b"], "rid": ["same", "same"]}),
              "generate-logprob-text": (GEN, generate(return_logprob=True, top_logprobs_num=20, logprob_start_len=0,
                                                      return_text_in_logprobs=True, stream=True)),
              "tokenize-empty": (TOK, {"prompt": ""}), "tokenize-empty-list": (TOK, {"prompt": []}),
              "end-unknown-session": (END, {"session_id": "no-such-session"}),
              "upload-mixed": (IMAGES, {"images": ["epd-image:" + "0" * 64, "nope"]})}
    for name, (path, body) in shapes.items():
        yield Probe(f"shape:{name}", path, dumps(body))


def route_probes(model: str) -> Iterator[Probe]:
    """No or a wrong API key, unknown paths and methods, bodies where none is expected, query strings."""
    for path in (CHAT, GEN, IMAGES):
        yield Probe(f"auth:none:{path}", path, dumps(chat(model)), auth=False)
    yield Probe("auth:none:metrics", "/metrics", b"", method="GET", auth=False)
    odd = [("PUT", GEN), ("DELETE", CHAT), ("PATCH", "/v1/models"), ("GET", "/v1/nope"), ("POST", "/health"),
           ("GET", "/get_server_info?integrity=1"), ("GET", "/get_server_info?integrity=%00"), ("POST", "/flush_cache"),
           ("GET", "/flush_cache"), ("GET", "/v1/models?x=\u00ff"), ("OPTIONS", CHAT), ("GET", "/%2e%2e/etc/passwd"),
           ("GET", "/" + "a" * 8000)]
    for method, path in odd:
        yield Probe(f"route:{method}:{path[:40]}", path, dumps(chat(model)), method=method)


def probes(model: str, image_prompt: str, urls: list[tuple[str, str]] = ()) -> list[Probe]:
    """The whole corpus, in a fixed order; `urls` are extra image URLs (the image host's)."""
    makers: list[Callable[..., Iterator[Probe]]] = [text_probes, number_probes, size_probes, structure_probes,
                                                     route_probes]
    out = [p for make in makers for p in make(model)]
    return out + list(image_probes(model, image_prompt, list(urls)))

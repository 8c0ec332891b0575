"""The SGLang-native API (/generate and friends) over raw HTTP, against a real `epd serve tiny`."""
from __future__ import annotations

import base64
import re
import time

import httpx
import orjson
import pytest

from images import image_bytes, make_image

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.timeout(120)

PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def generate(http, **body):
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_model_info(http, server):
    for path in ("/get_model_info", "/model_info"):
        info = http.get(path).json()
        assert info["is_generation"] is True and info["model_path"].endswith("tiny-seed0-v1")


def test_max_new_tokens_zero_prefills_only(http):
    out = generate(http, text=PROMPT, sampling_params={"max_new_tokens": 0})
    meta = out["meta_info"]
    assert out["text"] == "" and meta["completion_tokens"] == 0 and meta["prompt_tokens"] > 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}


def test_batched_text_gives_a_list(http):
    outs = generate(http, text=[PROMPT, "import os"], sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["meta_info"]["id"] != outs[1]["meta_info"]["id"]
    single = generate(http, text="import os", sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert single["text"] == outs[1]["text"] and single["meta_info"]["completion_tokens"] == 4


def test_input_logprobs_from_start_len(http):
    body = dict(text=PROMPT, sampling_params={"max_new_tokens": 2, "temperature": 0}, return_logprob=True,
                return_text_in_logprobs=True, top_logprobs_num=2)
    full = generate(http, **body, logprob_start_len=0)["meta_info"]
    part = generate(http, **body, logprob_start_len=2)["meta_info"]
    n = full["prompt_tokens"]
    assert len(full["input_token_logprobs"]) == n and full["input_token_logprobs"][0][0] is None
    assert len(part["input_token_logprobs"]) == n - 2
    for a, b in zip(full["input_token_logprobs"][2:], part["input_token_logprobs"]):
        assert a[1:] == b[1:] and a[0] == pytest.approx(b[0], abs=1e-4)
    assert "".join(t for _, _, t in full["input_token_logprobs"]) == PROMPT
    assert len(full["output_token_logprobs"]) == 2 and len(full["output_top_logprobs"][0]) == 2
    assert full["input_top_logprobs"][0] is None and len(full["input_top_logprobs"][1]) == 2
    plain = generate(http, text=PROMPT, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                     logprob_start_len=0)["meta_info"]
    assert plain["input_token_logprobs"][1][2] is None and "input_top_logprobs" not in plain


def test_streaming_text_is_cumulative(http):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 6, "temperature": 0}, "stream": True}
    events = []
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    body["stream"] = False
    assert generate(http, **body)["text"] == texts[-1]



def stream_chunks(http, body: dict) -> list[dict]:
    with http.stream("POST", "/generate", json=body | {"stream": True}) as r:
        assert r.status_code == 200
        events = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("top_n", [0, 3])
def test_streamed_logprobs_are_incremental_as_sglang_sends_them(http, top_n):
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": top_n, "return_text_in_logprobs": True}
    chunks = stream_chunks(http, body)
    whole = generate(http, **body)
    assert len(chunks) > 2
    seen = []
    for c in chunks:
        meta = c["meta_info"]
        assert c["text"]  # never a chunk without text
        seen += meta["output_token_logprobs"]  # only this chunk's new tokens
        assert meta["output_token_logprobs_length"] == meta["completion_tokens"] == len(seen) == len(c["output_ids"])
        assert [t for _, t, _ in seen] == c["output_ids"]
        if top_n:
            assert len(meta["output_top_logprobs"]) == len(meta["output_token_logprobs"])
        assert len(meta["input_token_logprobs"]) == 1  # the default start: the last prompt token
    full = whole["meta_info"]
    assert full["output_token_logprobs_length"] == full["completion_tokens"] == 12
    assert [t for _, t, _ in seen] == [t for _, t, _ in full["output_token_logprobs"]] == whole["output_ids"]
    assert [lp for lp, _, _ in seen] == pytest.approx([lp for lp, _, _ in full["output_token_logprobs"]], abs=1e-4)
    assert "".join(text for _, _, text in seen) == whole["text"] == chunks[-1]["text"]
    assert full.keys() == chunks[-1]["meta_info"].keys() >= {"id", "finish_reason", "prompt_tokens",
                                                             "completion_tokens", "cached_tokens",
                                                             "weight_version", "e2e_latency"}

def test_image_data_and_regex(http):
    b64 = base64.b64encode(image_bytes(make_image("blue", (64, 64)))).decode()
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    out = generate(http, text=text, image_data=b64,
                   sampling_params={"max_new_tokens": 8, "regex": "(red|blue|green)", "temperature": 0})
    assert re.fullmatch("red|blue|green", out["text"]) and out["meta_info"]["finish_reason"]["type"] == "stop"
    with_url = generate(http, text=text, image_data=f"data:image/png;base64,{b64}",
                        sampling_params={"max_new_tokens": 0})
    assert with_url["meta_info"]["prompt_tokens"] == out["meta_info"]["prompt_tokens"]


def test_n_and_input_ids(http):
    ids = generate(http, text=PROMPT, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                   logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    outs = generate(http, input_ids=[i for _, i, _ in ids],
                    sampling_params={"max_new_tokens": 3, "n": 2, "temperature": 0})
    assert len(outs) == 2 and outs[0]["text"] == outs[1]["text"]


def test_flush_cache(http):
    r = http.post("/flush_cache")
    assert r.status_code == 200


def metric_wait(server, pred, timeout=15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if pred(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_disconnect_aborts_and_frees_kv(server):
    idle = metric_wait(server, lambda m: m["epd_num_running_requests"] == 0)
    baseline = idle["epd_kv_request_pages"]
    aborted = idle.get('epd_requests_finished_total{finish_reason="abort"}', 0.0)
    body = {"text": PROMPT, "stream": True,
            "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 1.0}}
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as c:
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6)) if line.startswith("data:")]
            assert got
            busy = server.metrics()
            assert busy["epd_num_running_requests"] >= 1 and busy["epd_kv_request_pages"] > baseline
    after = metric_wait(server, lambda m: m["epd_num_running_requests"] == 0
                        and m["epd_kv_request_pages"] == baseline)
    assert after["epd_num_running_requests"] == 0
    assert after["epd_kv_request_pages"] == baseline
    assert after['epd_requests_finished_total{finish_reason="abort"}'] == aborted + 1

"""The tiny LLaVA-1.5 (`epd make-tiny-model --arch llava`) end to end: greedy tokens equal transformers', the
same tokens on every topology, `epd serve` with the official openai client and image URLs, the DSL, and
`epd bench` against it."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

import epdlang as epd
from deployment_helpers import ENGINE_ARGS, prepare, run_all, tokens
from epdlang.sampling import SamplingParams
from images import image_bytes, make_image, serve_image
from reference import reference_greedy
from runtime.cluster.deployment import Deployment
from runtime.cluster.server_process import free_port, wait_healthy
from runtime.engine.core import Engine
from runtime.tiny_model import ensure_tiny_model

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def llava_dir() -> Path:
    return ensure_tiny_model("tiny", arch="llava")


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                         {"type": "image", "image": p} for p in parts]}]


def cases() -> dict[str, dict]:
    red, blue = make_image("red", (200, 150)), make_image("blue", (96, 96))
    return {"text": {"messages": user("Say hi.")},
            "one_image": {"messages": user(red, "What is this?")},
            "two_images": {"messages": user(red, "and", blue, "Compare them.")}}


@pytest.fixture(scope="module")
def reference(llava_dir) -> dict[str, tuple[int, ...]]:
    engine = Engine(llava_dir, **ENGINE_ARGS)
    return {name: engine.generate(dict(req), GREEDY)[0].token_ids for name, req in cases().items()}


@pytest.mark.parametrize("page_size,budget", [(1, 2048), (16, 2048), (16, 100)], ids=["p1", "p16", "chunked"])
def test_engine_greedy_equals_transformers(llava_dir, page_size, budget):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype="float32").eval()
    engine = Engine(llava_dir, page_size=page_size, prefill_token_budget=budget, kv_cache_bytes=32 << 20)
    assert engine.processor.tokens_per_image == 256 and engine.model.config.architecture == hf.config.architectures[0]
    for name, req in cases().items():
        prepared = engine.processor.prepare(req["messages"])
        want = reference_greedy(hf, engine.processor, prepared, 12)
        [out] = engine.generate(dict(req), SamplingParams(max_new_tokens=12))
        assert list(out.token_ids) == want, name
        assert prepared.input_ids.count(engine.processor.image_token_id) == 256 * len(prepared.images)


@pytest.mark.parametrize("spec", ["EPD", "E,PD", "EP,D", "E,P,D", "2E,P,D"])
def test_tokens_equal_engine_on_every_topology(spec, llava_dir, reference):
    with Deployment(llava_dir, spec, **ENGINE_ARGS) as dep:
        named = cases()
        results = run_all(dep, [prepare(dep, req, GREEDY, rid=name) for name, req in named.items()])
        for name, outs in zip(named, results):
            assert not isinstance(outs, BaseException), f"{name}: {outs}"
            assert outs[-1].error is None and tokens(outs) == reference[name], f"{spec} {name}"


def test_dsl_program_on_llava(llava_dir):
    @epd.function
    def describe(s, img):
        s += epd.user(epd.image(img) + "What is this?")
        s += epd.assistant(epd.gen("answer", max_tokens=6, temperature=0))

    with epd.Runtime(model=llava_dir, **ENGINE_ARGS) as rt:
        state = describe.run(make_image("green", (64, 64)), backend=rt)
        assert state.text().startswith("USER: <image>\nWhat is this? ASSISTANT:")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                    {"role": "assistant", "content": state["answer"]}]
        templated = rt.processor.tokenizer.apply_chat_template(messages, tokenize=False)
        assert state.text() == templated  # the DSL renders the model's own chat template
        assert state.get_meta_info("answer")["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def llava_server(llava_dir, tmp_path_factory):
    port, log = free_port(), tmp_path_factory.mktemp("llava") / "server.log"
    args = [sys.executable, "-m", "runtime.cli", "serve", "tiny-llava", "--port", str(port), "--instances", "E,PD",
            "--allow-private-media-urls", "--kv-cache-mb", "64", "--num-threads", "1", "--log-level", "warning"]
    with log.open("wb") as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180.0, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_openai_client_with_image_urls(llava_server, llava_dir, reference):
    client = openai.OpenAI(base_url=f"{llava_server}/v1", api_key="none", max_retries=0)
    [model] = [m.id for m in client.models.list().data]
    want = AutoTokenizer.from_pretrained(llava_dir).decode(reference["one_image"], skip_special_tokens=True)
    png = image_bytes(make_image("red", (200, 150)))
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    with serve_image(png) as base:
        for url in (data_url, f"{base}/red.png"):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
            r = client.chat.completions.create(model=model, max_tokens=10, temperature=0,
                                               messages=[{"role": "user", "content": content}],
                                               extra_body={"ignore_eos": True})
            assert r.choices[0].message.content == want and r.usage.completion_tokens == 10
    info = httpx.get(f"{llava_server}/get_model_info", timeout=30).json()
    assert info["architectures"] == ["LlavaForConditionalGeneration"] and info["model_type"] == "llava"


def test_epd_bench_runs_against_llava(llava_server, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "--base-url", llava_server,
                          "--dataset", "fixed", "--image-size", "224", "--num-prompts", "4", "--output-len", "6",
                          "--ignore-eos",
                          "--max-concurrency", "2", "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run] = list(tmp_path.glob("*.json"))
    doc = json.loads(run.read_text())
    assert doc["completed"] == 4 and doc["failed"] == 0 and all(r["output_tokens"] == 6 for r in doc["requests"])

"""`epd serve tiny --instances E,P,D --ray local`: a private Ray cluster places the instances, the official
openai client is served, /get_server_info and /metrics say where each instance runs and how tensors
moved, and SIGTERM leaves no Ray process behind. Without `--ray`, Ray is never imported."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from runtime.cluster.server_process import free_port, wait_healthy
from server_helpers import data_url

pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
RAY_PROCESSES = "raylet|gcs_server|ray::|dashboard_agent|runtime_env_agent|log_monitor.py|ray/_private"


def ray_processes() -> set[int]:
    out = subprocess.run(["pgrep", "-f", RAY_PROCESSES], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()} - {os.getpid()}


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" in line:
            name, _, rest = line.partition("{")
            labels, _, value = rest.rpartition("} ")
            pairs = (kv.split("=", 1) for kv in labels.split('",') if kv)
            out.append((name, {k: v.strip('"') for k, v in pairs}, float(value)))
    return out


def test_epd_serve_ray_local(tmp_path):
    from openai import OpenAI

    before, port = ray_processes(), free_port()
    log = tmp_path / "server.log"
    args = [sys.executable, "-m", "runtime.cli", "serve", "tiny-random", "--instances", "E,P,D", "--ray", "local",
            "--port", str(port), "--num-threads", "3", "--kv-cache-mb", "32", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180.0, log)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60)
        content = [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "What is it?"}]
        reply = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": content}],
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        streamed = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": content}],
                                                  max_tokens=8, temperature=0, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
        assert text == reply.choices[0].message.content  # greedy, and the image now cached on P

        info = httpx.get(f"{url}/get_server_info", timeout=30).json()["engine"]
        assert {i["node_id"] for i in info["instances"].values()} == {info["ray"]["router_node_id"]}  # one node
        assert {(lk["src"], lk["dst"]): lk["transport"] for lk in info["ray"]["links"]} == {
            ("router", "E0"): "shm", ("E0", "P0"): "shm", ("P0", "D0"): "shm"}
        node = info["ray"]["router_node_id"]
        assert all(i["address"] for i in info["instances"].values())
        samples = metric_samples(httpx.get(f"{url}/metrics", timeout=30).text)
        placed = {labels["instance"]: labels["node_id"] for name, labels, _ in samples
                  if name == "epd_instance_placement"}
        assert placed == {"E0": node, "P0": node, "D0": node}
        handoffs = [v for name, labels, v in samples if name == "epd_link_tensors" and labels["src"] == "P0"]
        assert handoffs == [2.0]  # two requests, each one KV handoff P0 -> D0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]  # uvicorn re-raises the signal once drained
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not ray_processes() - before, "Ray processes left behind after SIGTERM"


def test_without_ray_flag_ray_is_not_imported(tiny_model_dir):
    """A deployment, its server app and the DSL runtime run a request without importing Ray."""
    code = f"""
import asyncio, sys
from runtime.cluster.deployment import Deployment
from runtime.messages import GenerateRequest
from runtime.server.app import create_app
from runtime.server.cli import config_from_args
import epdlang
from epdlang.sampling import SamplingParams
with Deployment({str(tiny_model_dir)!r}, "EPD", page_size=8, kv_cache_bytes=8 << 20) as dep:
    ids = dep.processor.prepare(prompt="hi").input_ids
    async def go():
        return [o async for o in dep.generate(GenerateRequest("r", ids, (), SamplingParams(max_new_tokens=2)))]
    assert asyncio.run(go())[-1].finished
assert "ray" not in sys.modules, "ray was imported"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_dsl_runtime_on_ray_local(tiny_model_dir):
    """`epd.Runtime(instances=..., ray="local")`: the same program, the same greedy text as in-process."""
    import ray

    import epdlang as epd
    from images import make_image

    @epd.function
    def describe(s, img):
        s += epd.user(epd.image(img) + "Describe it.")
        s += epd.assistant(epd.gen("answer", max_tokens=8, temperature=0.0))

    image, before = make_image("teal", (112, 112)), ray_processes()
    with epd.Runtime(tiny_model_dir, instances="EPD", kv_cache_bytes=16 << 20) as local:
        expected = describe.run(image, backend=local)["answer"]
    with epd.Runtime(tiny_model_dir, instances="E,P,D", ray="local", kv_cache_bytes=16 << 20) as on_ray:
        assert ray.is_initialized()
        assert describe.run(image, backend=on_ray)["answer"] == expected
        assert on_ray.stats()["images_encoded"] == 1
    assert not ray.is_initialized()  # the private cluster stops with the runtime
    assert not ray_processes() - before

"""`epd serve tiny --instances E,P,D`: the HTTP server in front of a disaggregated topology answers the
official openai client with the same greedy text as the single-process engine, and SIGTERM takes
every instance process and shared-memory segment with it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from deployment_helpers import alive
from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.server_process import free_port, stop, wait_healthy
from runtime.cluster.transfer import shm_dir
from runtime.engine.core import Engine
from server_helpers import data_url


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _epd_segments() -> set[str]:
    return {name for name in os.listdir(shm_dir()) if name.startswith("epd-")}


def test_openai_client_on_e_p_d_topology(tmp_path, tiny_model_dir):
    image = make_image("teal", (168, 112))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    want = Engine(tiny_model_dir, kv_cache_bytes=32 << 20).generate(
        {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": "What is in the picture?"}]}]},
        SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    before = _epd_segments()
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "tiny-random", "--instances", "E,P,D",
                                 "--port", str(port), "--kv-cache-mb", "32", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, 180.0, log)
        instances = _children(proc.pid)
        assert len(instances) == 3
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=10, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.choices[0].message.content == want.text
        assert reply.usage.completion_tokens == 10
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for name, roles in (("E0", "E"), ("P0", "P"), ("D0", "D")):
            assert f'epd_instance_inflight{{instance="{name}",roles="{roles}"}} 0.0' in metrics
        assert 'epd_instance_encode_tokens{instance="E0",roles="E"}' in metrics
        passes = {(name, stage): float(n) for name, stage, n in re.findall(
            r'epd_instance_stage_passes_total\{instance="(\w+)",roles="\w+",stage="(\w+)"\} (\S+)', metrics)}
        assert passes == {("E0", "encode"): 1, ("P0", "prefill"): 1, ("D0", "decode"): 9}  # one token from P, 9 on D
        assert 'epd_instance_stage_seconds_total{instance="D0",roles="D",stage="decode"}' in metrics
    finally:
        stop(proc)
    assert proc.returncode in (0, -signal.SIGTERM), log.read_text()[-2000:]  # uvicorn re-raises the signal
    assert "Traceback" not in log.read_text()
    assert not any(alive(pid) for pid in instances)
    assert _epd_segments() <= before

"""A pytest plugin: one real `epd serve tiny` subprocess for every server test file (session scope).

Test files opt in with `pytest_plugins = ["server_fixture"]`, so the server starts once and is
killed at the end of the session.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_helpers import API_KEY, LIMITS, Server, free_port

def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("server")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    port = free_port()
    args = [sys.executable, "-m", "runtime.cli", "serve", "tiny", "--port", str(port), "--api-key", API_KEY,
            "--allowed-local-media-path", str(media), "--kv-cache-mb", "64", "--max-model-len", "4096",
            "--num-threads", "1", "--log-level", "warning", *[x for kv in LIMITS.items() for x in kv]]
    log = root / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield Server(url, API_KEY, media, outside)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

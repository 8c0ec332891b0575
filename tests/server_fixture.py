"""A pytest plugin: one real `epd serve tiny` subprocess for every server test file (session scope).

Test files opt in with `pytest_plugins = ["server_fixture"]`, so the server starts once and is
killed at the end of the session.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cluster.server_process import free_port, wait_healthy
from server_helpers import API_KEY, LIMITS, Server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("server")
    media, outside = root / "media", root / "outside"
    media.mkdir()
    outside.mkdir()
    port = free_port()
    args = [sys.executable, "-m", "runtime.cli", "serve", "tiny-random", "--port", str(port), "--api-key", API_KEY,
            "--allowed-local-media-path", str(media), "--allow-private-media-urls", "--kv-cache-mb", "64",
            "--max-model-len", "4096",
            "--num-threads", "1", "--log-level", "warning", *[x for kv in LIMITS.items() for x in kv]]
    log = root / "server.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180.0, log)
        yield Server(url, API_KEY, media, outside)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

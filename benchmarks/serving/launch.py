"""Self-launch: start `epd serve MODEL --instances SPEC` on a free port, wait for /health, stop it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not healthy after {timeout_s:g}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_command(model: str, spec: str, port: int, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", model, "--instances", spec,
            "--host", "127.0.0.1", "--port", str(port), *extra]


@contextmanager
def launched(spec: str, model: str = "tiny", extra: Sequence[str] = (), log_dir: Path = Path("."),
             timeout_s: float = 300.0) -> Iterator[str]:
    """Yield the base URL of a running `epd serve` with topology `spec`; always stop it on exit."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"epd-serve-{spec.replace(',', '_')}-{port}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
    with log.open("wb") as out:
        proc = subprocess.Popen(serve_command(model, spec, port, extra), stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout_s)
        yield url
    finally:
        stop(proc)

"""Running `epd serve` as a child process: the command, free port, readiness wait, graceful stop."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def serve_command(model: str, spec: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", model, "--instances", spec,
            "--host", "127.0.0.1", "--port", str(port), *extra]


def spawn_server(model: str, spec: str, port: int, extra: Sequence[str], log: Path) -> subprocess.Popen:
    """`epd serve MODEL --instances SPEC` on 127.0.0.1:`port`, output to `log`, importable from this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH"))))}
    with log.open("wb") as out:
        return subprocess.Popen(serve_command(model, spec, port, extra), stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=REPO_ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, log: Path | None = None) -> None:
    """Poll `/health` until 200; raise RuntimeError (with the log's tail) if the server dies or is late."""
    tail = lambda: f":\n{log.read_text()[-3000:]}" if log else ""  # noqa: E731
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}{tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server was not healthy after {timeout_s:g}s{tail()}")


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM (graceful drain), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

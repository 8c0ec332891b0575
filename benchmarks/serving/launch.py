"""Self-launch: start `epd serve MODEL --instances SPEC` on a free port, wait for /health, stop it."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from runtime.cluster.server_process import free_port, stop, wait_healthy

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        wait_healthy(url, proc, timeout_s, log)
        yield url
    finally:
        stop(proc)

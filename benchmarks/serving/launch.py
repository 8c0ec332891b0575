"""Self-launch: start `epd serve MODEL --instances SPEC` on a free port, wait for /health, stop it."""
from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from runtime.cluster.server_process import free_port, spawn_server, stop, wait_healthy


@contextmanager
def launched_server(spec: str, model: str = "tiny-random", extra: Sequence[str] = (), log_dir: Path = Path("."),
                    timeout_s: float = 300.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield the base URL and the process (the API server; its instances are its children) of a running
    `epd serve` with topology `spec`; always stop it on exit."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"epd-serve-{spec.replace(',', '_')}-{port}.log"
    proc = spawn_server(model, spec, port, extra, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s, log)
        yield url, proc
    finally:
        stop(proc)


@contextmanager
def launched(spec: str, model: str = "tiny-random", extra: Sequence[str] = (), log_dir: Path = Path("."),
             timeout_s: float = 300.0) -> Iterator[str]:
    """Yield the base URL of a running `epd serve` with topology `spec`; always stop it on exit."""
    with launched_server(spec, model, extra, log_dir, timeout_s) as (url, _):
        yield url

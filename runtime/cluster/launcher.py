"""Starts, watches and restarts the instance processes of one deployment."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime.cluster.instance import InstanceConfig
from runtime.cluster.topology import InstanceSpec, Topology

log = logging.getLogger(__name__)
MAX_RESTARTS_PER_MINUTE = 5


class Launcher:
    def __init__(self, topology: Topology, base: InstanceConfig, log_dir: Path) -> None:
        self.specs = {spec.name: spec for spec in topology.instances}
        self.base, self.log_dir = base, log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.ever_ready: set[str] = set()
        self.failed: dict[str, str] = {}  # name -> why it is gone for good
        self._restarts: dict[str, deque[float]] = {name: deque() for name in self.specs}
        self.stopping = False

    def start_all(self) -> None:
        for name in self.specs:
            self.start(name)

    def start(self, name: str) -> None:
        spec = self.specs[name]
        cfg = dataclasses.replace(self.base, name=name, roles=spec.role_str, threads=spec.threads,
                                  cores=spec.cores)
        env = dict(os.environ)
        if spec.threads:
            env["OMP_NUM_THREADS"] = str(spec.threads)
        logfile = open(self.log_dir / f"{name}.log", "ab")
        with logfile:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "runtime.cluster.instance", json.dumps(dataclasses.asdict(cfg))],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, env=env)

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def reap(self) -> list[str]:
        """Names of instances that died since the last call; each is restarted if it may be."""
        if self.stopping:
            return []
        dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
        for name in dead:
            code = self.procs.pop(name).returncode
            if self._may_restart(name):
                log.error("instance %s exited with code %s; restarting", name, code)
                self.start(name)
            else:
                self.failed[name] = f"exited with code {code}: {self.log_tail(name, 800)}"
                log.error("instance %s exited with code %s; not restarting", name, code)
        return dead

    def _may_restart(self, name: str) -> bool:
        if name not in self.ever_ready:
            return False  # it never came up: restarting would only fail again
        now, history = time.monotonic(), self._restarts[name]
        while history and now - history[0] > 60:
            history.popleft()
        history.append(now)
        return len(history) <= MAX_RESTARTS_PER_MINUTE

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the processes to exit (they were told to), then terminate, then kill."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            _wait(proc, max(0.0, deadline - time.monotonic()))
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                if not _wait(proc, 3.0):
                    proc.kill()
                    proc.wait()


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    try:
        proc.wait(timeout=timeout_s)
        return True
    except subprocess.TimeoutExpired:
        return False


def describe(spec: InstanceSpec) -> dict[str, Any]:
    return {"roles": spec.role_str, "threads": spec.threads, "cores": list(spec.cores or ())}

"""What the reliability modes read off a running server: its processes and their memory, shared-memory
segments, open file descriptors, page accounting, and whether it still answers."""
from __future__ import annotations

import os
from pathlib import Path

import httpx


def server_info(url: str, integrity: bool = False, timeout_s: float = 30.0) -> dict:
    params = {"integrity": "1"} if integrity else {}
    return httpx.get(f"{url}/get_server_info", params=params, timeout=timeout_s).json()


def pids(info: dict) -> dict[str, int]:
    """The API server's pid and every instance's, by name."""
    out = {"server": info["pid"]}
    out |= {name: inst["pid"] for name, inst in info["engine"]["instances"].items() if inst.get("pid")}
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None



def integrity_ok(info: dict) -> bool:
    """Every instance's page accounting holds (free + cached + in use = total, cache invariants)."""
    per = info.get("integrity") or {}
    return bool(per) and all(r.get("ok") for r in per.values())


def healthy(url: str, model: str = "tiny-random", timeout_s: float = 60.0) -> bool:
    """/health answers 200 and a small chat request completes."""
    try:
        if httpx.get(f"{url}/health", timeout=timeout_s).status_code != 200:
            return False
        body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

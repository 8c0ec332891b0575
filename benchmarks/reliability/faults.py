"""Faults: under steady load, SIGKILL each kind of instance in turn (E, P, D) and watch what happens.

Per kill: the requests the router retried, the requests that failed and how long after the kill they
failed, and how long until the instance was back. No request may hang. Afterwards every instance's page
accounting must hold and no shared-memory segment may be left.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import httpx
import orjson

from benchmarks.reliability import probe
from benchmarks.serving.images import image_data_url
from runtime.cluster.transfer import list_segments

SERVE_ARGS = ["--kv-cache-mb", "64", "--num-threads", "2", "--log-level", "warning"]
HANG_GRACE_S = 30.0
# A request on a killed instance must fail this soon after the kill, not at the timeout. 5 s was missed
# by 0.14 s once on a loaded 2-core CI run: the bound is about promptness, not this CPU's speed.
FAIL_PROMPT_S = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    p.add_argument("--rate", type=float, default=3.0, help="requests per second, evenly spaced")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kill", default="E,P,D", help="roles to kill, in order, evenly spread over the run")


async def stream_one(client: httpx.AsyncClient, i: int, t0: float, output_len: int) -> dict:
    """One streamed multimodal chat request: when it started, first streamed, ended, and how."""
    body = {"model": "tiny-random", "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(160, 160, seed=i % 7)}},
                {"type": "text", "text": f"Describe picture {i}."}]}]}
    rec = {"start": time.monotonic() - t0, "first": None, "end": None, "outcome": "ok", "tokens": 0}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                rec["outcome"] = f"http_{r.status_code}"
            else:
                await _read_events(r, rec, t0)
    except httpx.HTTPError as exc:
        rec["outcome"] = f"connection: {type(exc).__name__}"
    rec["end"] = time.monotonic() - t0
    return rec


async def _read_events(r: httpx.Response, rec: dict, t0: float) -> None:
    async for line in r.aiter_lines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        doc = orjson.loads(line[5:])
        if "error" in doc:
            rec["outcome"] = "error"
            return
        for choice in doc.get("choices", []):
            if choice.get("delta", {}).get("content"):
                rec["first"] = rec["first"] or time.monotonic() - t0
                rec["tokens"] += 1
            if choice.get("finish_reason") == "error":
                rec["outcome"] = "error"


async def killer(url: str, roles: list[str], seconds: float, t0: float) -> list[dict]:
    """SIGKILL one instance of each role at evenly spaced times; time how long until it is back."""
    kills = []
    for k, role in enumerate(roles):
        await asyncio.sleep(max(0.0, seconds * (k + 1) / (len(roles) + 1) - (time.monotonic() - t0)))
        info = await asyncio.to_thread(probe.server_info, url)
        name, inst = next((n, v) for n, v in info["engine"]["instances"].items() if role in v["roles"])
        retried_before = info["engine"].get("router_retried", 0)
        os.kill(inst["pid"], signal.SIGKILL)
        killed = time.monotonic() - t0
        back = await _wait_back(url, name, inst["pid"], t0)
        kills.append({"instance": name, "killed_at_s": round(killed, 2), "back_after_s": back,
                      "retried_before": retried_before})
    return kills


async def _wait_back(url: str, name: str, old_pid: int, t0: float, limit_s: float = 120.0) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        inst = (await asyncio.to_thread(probe.server_info, url))["engine"]["instances"][name]
        if inst.get("ready") and inst.get("pid") not in (None, old_pid):
            return round(time.monotonic() - start, 2)
        await asyncio.sleep(0.2)
    return None


async def load(url: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.seconds + HANG_GRACE_S)) as client:
        kill_task = asyncio.ensure_future(killer(url, args.kill.split(","), args.seconds, t0))
        tasks = []
        for i in range(int(args.seconds * args.rate)):
            await asyncio.sleep(max(0.0, i / args.rate - (time.monotonic() - t0)))
            tasks.append(asyncio.ensure_future(stream_one(client, i, t0, args.output_len)))
        left = args.seconds + HANG_GRACE_S - (time.monotonic() - t0)
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, left))
        for task in pending:
            task.cancel()
        records = [t.result() if t in done else {"outcome": "hung"} for t in tasks]
        return records, await kill_task


def per_kill(records: list[dict], kills: list[dict], retried_after: int) -> list[dict]:
    """Attribute each failure to the last kill before it ended; retries from the router's counter."""
    out = []
    for k, kill in enumerate(kills):
        until = kills[k + 1]["killed_at_s"] if k + 1 < len(kills) else float("inf")
        failed = [r for r in records
                  if r["outcome"] not in ("ok", "hung") and kill["killed_at_s"] <= r["end"] < until]
        retried_next = kills[k + 1]["retried_before"] if k + 1 < len(kills) else retried_after
        slowest = max((r["end"] - kill["killed_at_s"] for r in failed), default=0.0)
        out.append({**{x: kill[x] for x in ("instance", "killed_at_s", "back_after_s")},
                    "retried": retried_next - kill["retried_before"], "failed": len(failed),
                    "fail_after_kill_s_max": round(slowest, 2)})
    return out


def run(url: str, args: argparse.Namespace) -> dict:
    records, kills = asyncio.run(load(url, args))
    info = probe.server_info(url, integrity=True)
    report = {"requests": len(records), "ok_requests": sum(r["outcome"] == "ok" for r in records),
              "hung": sum(r["outcome"] == "hung" for r in records),
              "outcomes": sorted({r["outcome"] for r in records}),
              "kills": per_kill(records, kills, info["engine"].get("router_retried", 0)),
              "integrity_ok": probe.integrity_ok(info), "integrity": info.get("integrity"),
              "segments_left": list_segments(info["segment_prefix"]), "healthy_after": probe.healthy(url)}
    report["ok"] = (report["hung"] == 0 and report["integrity_ok"] and not report["segments_left"]
                    and report["healthy_after"] and all(k["back_after_s"] is not None for k in report["kills"])
                    and all(k["fail_after_kill_s_max"] <= FAIL_PROMPT_S for k in report["kills"]))
    return report

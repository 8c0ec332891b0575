"""Overload: far more concurrent requests and context than the KV pool holds, with several images each.

Every request must complete with the output it gives on an unloaded server, or be refused at admission
with a clear 4xx, or get 503 with Retry-After once the waiting queue (--max-waiting-requests) is full.
Nothing may crash, memory must stay bounded, and the page accounting must hold afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time

import httpx

from benchmarks.reliability import probe
from benchmarks.serving.images import image_data_url
from runtime.cluster.transfer import list_segments

SERVE_ARGS = ["--kv-cache-mb", "8", "--max-waiting-requests", "12", "--max-model-len", "8192",
              "--num-threads", "2", "--log-level", "warning"]
WORDS = "the red circle sits left of a blue square while green lines cross a yellow field".split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=64, help="requests sent at once")
    p.add_argument("--distinct", type=int, default=16, help="distinct prompts among them (each also run alone)")
    p.add_argument("--images", type=int, default=3, help="images per request")
    p.add_argument("--text-words", type=int, default=400)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole loaded phase")


def bodies(args: argparse.Namespace, model: str) -> list[dict]:
    """Seeded distinct chat requests; every fourth asks for more context than the pool can ever hold."""
    rng, out = random.Random(0), []
    for i in range(args.distinct):
        words = args.text_words * (8 if i % 4 == 3 else 1)
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        images = [{"type": "image_url", "image_url": {"url": image_data_url(224, 224, seed=100 * i + k)}}
                  for k in range(args.images)]
        out.append({"model": model, "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True,
                    "messages": [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]})
    return out


async def send(client: httpx.AsyncClient, body: dict) -> dict:
    try:
        r = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return {"status": None, "error": f"{type(exc).__name__}: {exc}"}
    doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    out = {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
    if r.status_code == 200:
        out["text"] = doc["choices"][0]["message"]["content"]
    else:
        out["error_body"] = set(doc.get("error", {})) == {"message", "type", "param", "code"}
    return out


async def loaded(url: str, work: list[dict], timeout_s: float, watch: dict[str, int]) -> tuple[list[dict], dict]:
    """Send everything at once while sampling every process's RSS."""
    peak: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=len(work))) as client:
        task = asyncio.gather(*(send(client, b) for b in work))
        deadline = time.monotonic() + timeout_s
        while not task.done() and time.monotonic() < deadline:
            for name, pid in watch.items():
                peak[name] = max(peak.get(name, 0.0), probe.rss_mb(pid) or 0.0)
            await asyncio.sleep(0.5)
        return await asyncio.wait_for(task, max(1.0, deadline - time.monotonic())), peak


def classify(results: list[dict], expected: list[dict]) -> dict:
    counts = {"completed": 0, "identical": 0, "refused_4xx": 0, "refused_503": 0, "with_retry_after": 0,
              "bad_error_bodies": 0, "server_errors": 0, "crashes": 0}
    for got, want in zip(results, expected):
        status = got["status"]
        if status is None:
            counts["crashes"] += 1
        elif status == 200:
            counts["completed"] += 1
            counts["identical"] += got["text"] == want.get("text")
        elif status == 503:
            counts["refused_503"] += 1
            counts["with_retry_after"] += got["retry_after"] is not None
        elif 400 <= status < 500:
            counts["refused_4xx"] += 1
        else:
            counts["server_errors"] += 1
        counts["bad_error_bodies"] += status not in (None, 200) and not got.get("error_body")
    return counts


def run(url: str, args: argparse.Namespace) -> dict:
    model = probe.served_model(url)
    distinct = bodies(args, model)
    alone = asyncio.run(_one_by_one(url, distinct, args.timeout))  # the unloaded reference
    work = [distinct[i % len(distinct)] for i in range(args.requests)]
    info = probe.server_info(url)
    watch = probe.pids(info)
    before = {name: probe.rss_mb(pid) for name, pid in watch.items()}
    t0 = time.monotonic()
    results, peak = asyncio.run(loaded(url, work, args.timeout, watch))
    seconds = time.monotonic() - t0
    counts = classify(results, [alone[i % len(alone)] for i in range(args.requests)])
    after_info = probe.server_info(url, integrity=True)
    report = {"requests": len(work), **counts, "seconds": round(seconds, 1),
              "alone_statuses": sorted({r["status"] for r in alone}, key=str),
              "rss_mb": {n: {"before": before[n], "peak": peak.get(n), "after": probe.rss_mb(pid)}
                         for n, pid in watch.items()},
              "integrity_ok": probe.integrity_ok(after_info),
              "segments_left": list_segments(after_info["segment_prefix"]),
              "healthy_after": probe.healthy(url, model),
              "preemptions": after_info["engine"].get("num_preemptions", 0),
              "router": {k: v for k, v in after_info["engine"].items() if k.startswith("router_")}}
    report["ok"] = (counts["crashes"] == counts["server_errors"] == counts["bad_error_bodies"] == 0
                    and counts["identical"] == counts["completed"] > 0
                    and counts["refused_503"] == counts["with_retry_after"]
                    and report["integrity_ok"] and report["healthy_after"] and not report["segments_left"])
    return report


async def _one_by_one(url: str, work: list[dict], timeout_s: float) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as client:
        return [await send(client, b) for b in work]

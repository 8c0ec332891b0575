"""Soak: mixed steady traffic for M minutes (streams, multi-image requests, aborts, client disconnects
mid-stream, repeated sessions) while every process's RSS and open fds, and the shared-memory segments,
are sampled. After warm-up, each process may grow by at most 5%; when idle, no page may stay in use.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import httpx

from benchmarks.reliability import probe
from benchmarks.serving.images import image_data_url
from runtime.cluster.transfer import list_segments

# A small encoder cache fills (and starts evicting) within the warm-up, so growth after it is a leak.
SERVE_ARGS = ["--kv-cache-mb", "64", "--encoder-cache-mb", "16", "--num-threads", "2", "--log-level", "warning"]
MAX_GROWTH = 0.05


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--workers", type=int, default=4, help="clients sending back to back")
    p.add_argument("--warmup-fraction", type=float, default=0.2)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--plot", type=Path, default=Path("results/reliability/soak_rss.png"))


def chat(i: int, images: int, stream: bool, tokens: int = 16) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(128 + 32 * (k % 3), 128, seed=i * 5 + k)}}
             for k in range(images)]
    return {"model": "tiny-random", "max_tokens": tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": f"Look at {i}."}]}]}


async def action(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One seeded piece of traffic; returns its kind."""
    kind = rng.choice(["stream", "multi_image", "abort", "disconnect", "session"])
    if kind == "multi_image":
        await client.post("/v1/chat/completions", json=chat(i, 3, False))
    elif kind in ("stream", "abort"):
        async with client.stream("POST", "/v1/chat/completions", json=chat(i, 1, True, 48)) as r:
            async for n, _ in _enumerate(r.aiter_lines()):
                if kind == "abort" and n >= 3:
                    break  # leaving the stream closes the connection: the server aborts the request
    elif kind == "disconnect":
        try:
            await client.post("/v1/chat/completions", json=chat(i, 2, False, 200), timeout=0.3)
        except httpx.TimeoutException:
            pass  # the client went away mid-request
    else:
        sid = f"soak-{i % 6}"  # a few sessions, each coming back several times
        await client.post("/generate", json={"text": f"Turn {i} of the session.", "session_id": sid,
                                             "sampling_params": {"max_new_tokens": 8}})
        if rng.random() < 0.3:
            await client.post("/epd/end_session", json={"session_id": sid})
    return kind


async def _enumerate(lines):
    n = 0
    async for line in lines:
        yield n, line
        n += 1


async def traffic(url: str, args: argparse.Namespace, stop_at: float) -> dict[str, int]:
    counts: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker(w: int) -> None:
            rng, i = random.Random(w), w
            while time.monotonic() < stop_at:
                try:
                    kind = await action(client, rng, i)
                except httpx.HTTPError:
                    kind = "client_error"
                counts[kind] = counts.get(kind, 0) + 1
                i += args.workers

        await asyncio.gather(*(worker(w) for w in range(args.workers)))
    return counts


async def sampler(url: str, pids: dict[str, int], prefix: str, every_s: float, stop_at: float, t0: float) -> list:
    samples = []
    while time.monotonic() < stop_at:
        row = {"t": round(time.monotonic() - t0, 1), "segments": len(list_segments(prefix))}
        row |= {f"rss:{n}": probe.rss_mb(pid) for n, pid in pids.items()}
        row |= {f"fds:{n}": probe.open_fds(pid) for n, pid in pids.items()}
        samples.append(row)
        await asyncio.sleep(every_s)
    return samples


def growth(samples: list[dict], key: str, warm_until: float) -> float | None:
    """Growth of `key` from the first sample after warm-up to the last one."""
    after = [s[key] for s in samples if s["t"] >= warm_until and s.get(key)]
    return None if len(after) < 2 else (after[-1] - after[0]) / after[0]


def plot(samples: list[dict], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for n in names:
        ax.plot([s["t"] for s in samples], [s[f"rss:{n}"] for s in samples], label=n)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


async def soak(url: str, args: argparse.Namespace) -> tuple[dict, list, dict]:
    info = probe.server_info(url)
    pids, t0 = probe.pids(info), time.monotonic()
    stop_at = t0 + args.minutes * 60
    counts, samples = await asyncio.gather(traffic(url, args, stop_at),
                                           sampler(url, pids, info["segment_prefix"], args.sample_s, stop_at, t0))
    return counts, samples, pids


def run(url: str, args: argparse.Namespace) -> dict:
    counts, samples, pids = asyncio.run(soak(url, args))
    time.sleep(2.0)  # let aborted work drain
    info = probe.server_info(url, integrity=True)
    warm = args.minutes * 60 * args.warmup_fraction
    rss = {n: growth(samples, f"rss:{n}", warm) for n in pids}
    fds = {n: growth(samples, f"fds:{n}", warm) for n in pids}
    idle_pages = {n: r["in_use"] for n, r in (info.get("integrity") or {}).items()}
    plot(samples, list(pids), args.plot)
    report = {"minutes": args.minutes, "traffic": counts, "rss_growth": rss, "fd_growth": fds,
              "samples": samples, "idle_pages_in_use": idle_pages, "integrity_ok": probe.integrity_ok(info),
              "segments_left": list_segments(info["segment_prefix"]), "plot": str(args.plot),
              "healthy_after": probe.healthy(url)}
    report["ok"] = (all(g is not None and g < MAX_GROWTH for g in rss.values())
                    and all(g is not None and g < MAX_GROWTH for g in fds.values())
                    and not any(idle_pages.values()) and report["integrity_ok"] and not report["segments_left"]
                    and report["healthy_after"])
    return report

"""Fuzz: schema-generated (schemathesis) and hostile input on every route; no 5xx, no crash, healthy after.

Cases come from the server's OpenAPI schema: for each operation, schemathesis' Hypothesis strategies in positive
(fits the schema) and negative (does not) mode, seeded and generated before anything is sent, so the same seed
gives the same requests. Then the hand-made corpus of `hostile.py`. Every answer must be 2xx or 4xx, every 4xx
an OpenAI-style error body, every event stream free of in-band server errors, and afterwards `/health` is 200
and a plain chat request is answered.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.reliability import image_host
from benchmarks.reliability.hostile import Probe, probes

API_KEY = "fuzz-key"
SERVE_ARGS = ["--api-key", API_KEY, "--kv-cache-mb", "64", "--max-model-len", "1024", "--max-total-tokens", "256",
              "--default-max-tokens", "16", "--max-n", "4", "--max-images", "4", "--max-image-pixels", str(1 << 20),
              "--max-body-bytes", str(8 << 20), "--fetch-timeout", "2",
              "--allow-private-media-urls", "--num-threads", "2", "--log-level", "warning"]
IMAGE_PROMPTS = {"llava": "<image>\nwhat is this?"}
DEFAULT_IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>what is this?"
EXCERPT = 300


@dataclass(frozen=True)
class Request:
    """One request to send: raw body bytes, or none."""

    label: str
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=2000, help="about this many requests in all")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed for the generated cases")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="stop sending after this many seconds")
    parser.add_argument("--trace", type=Path, default=None, metavar="FILE",
                        help="write one JSON line per request (case, path, status, seconds)")


def run(url: str, args: argparse.Namespace) -> dict:
    return fuzz(url, args.requests, seed=args.seed, api_key=API_KEY, request_timeout_s=args.request_timeout,
                time_limit_s=args.time_limit, trace=args.trace)


def fuzz(url: str, total: int, seed: int = 0, api_key: str | None = API_KEY, request_timeout_s: float = 60.0,
         time_limit_s: float = 3600.0, hostile: bool = True, trace: Path | None = None,
         generated: int | None = None) -> dict:
    """Send the hostile corpus (if `hostile`), then `generated` schema cases (default: `total` minus the corpus);
    the JSON report."""
    from benchmarks.reliability.schema_cases import generated_requests, load_schema

    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.monotonic()
    with httpx.Client(base_url=url, timeout=request_timeout_s) as client, image_host.image_host() as host:
        model, image_prompt = server_model(client, auth)
        corpus = [probe_request(p, auth) for p in probes(model, image_prompt, image_host.urls(host))] \
            if hostile else []
        schema, source = load_schema(url, auth)
        count = max(0, total - len(corpus)) if generated is None else generated
        cases = generated_requests(schema, count, seed, model, auth)
        tally = Tally(schema_source=source, generated=len(cases), hostile=len(corpus))
        tally.send_all(client, [*corpus, *cases], t0 + time_limit_s)
        tally.healthy_after = healthy(client, auth, model)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("".join(json.dumps(t) + "\n" for t in tally.trace))
    return tally.report(time.monotonic() - t0)


def server_model(client: httpx.Client, auth: dict[str, str]) -> tuple[str, str]:
    """The served model name and a prompt with one image placeholder for `/generate`."""
    name = client.get("/v1/models", headers=auth).json()["data"][0]["id"]
    model_type = client.get("/get_server_info", headers=auth).json().get("epd", {}).get("model_type")
    return name, IMAGE_PROMPTS.get(model_type, DEFAULT_IMAGE_PROMPT)


def probe_request(p: Probe, auth: dict[str, str]) -> Request:
    headers = {"content-type": "application/json"} | (auth if p.auth else {})
    return Request(f"hostile:{p.name}", p.method, p.path, p.body or None, headers)


def healthy(client: httpx.Client, auth: dict[str, str], model: str) -> bool:
    """`/health` is 200 and a plain chat request gets an answer with text."""
    try:
        if client.get("/health").status_code != 200:
            return False
        body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4,
                "temperature": 0, "ignore_eos": True}
        r = client.post("/v1/chat/completions", json=body, headers=auth)
        return r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return False


def error_body_ok(content: bytes) -> bool:
    """`{"error": {"message": str, "type": str, "param", "code"}}`, nothing else."""
    try:
        err = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
            and isinstance(err["message"], str) and isinstance(err["type"], str))


def stream_errors(content: bytes) -> Iterator[dict]:
    """The error objects an SSE body carries in-band (`data: {"error": ...}`)."""
    for line in content.splitlines():
        if line.startswith(b"data: {") and b'"error"' in line:
            try:
                payload = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
                yield payload["error"]


@dataclass
class Tally:
    """Counts and findings as requests come back."""

    schema_source: str
    generated: int
    hostile: int
    by_status: Counter = field(default_factory=Counter)
    server_errors: list[dict] = field(default_factory=list)
    bad_error_bodies: list[dict] = field(default_factory=list)
    crashes: list[dict] = field(default_factory=list)
    sent: int = 0
    stopped_early: str | None = None
    healthy_after: bool = False
    trace: list[dict] = field(default_factory=list)

    def send_all(self, client: httpx.Client, reqs: list[Request], deadline: float) -> None:
        for req in reqs:
            if time.monotonic() > deadline:
                self.stopped_early = f"time limit reached after {self.sent} requests"
                return
            if not self.send(client, req) and not alive(client):
                self.stopped_early = f"the server died after {self.sent} requests"
                self.crashes.append(finding(req, "server died", b""))
                return

    def send(self, client: httpx.Client, req: Request) -> bool:
        """Send one request and record what came back; False if the connection failed."""
        self.sent += 1
        t0 = time.monotonic()
        try:
            r = client.request(req.method, req.path, content=req.body, headers=req.headers)
        except httpx.TransportError as exc:
            self.trace.append({"case": req.label, "path": req.path, "status": type(exc).__name__,
                               "s": round(time.monotonic() - t0, 3)})
            self.by_status["connection_error"] += 1
            self.crashes.append(finding(req, type(exc).__name__, str(exc).encode()))
            return False
        self.by_status[str(r.status_code)] += 1
        self.trace.append({"case": req.label, "path": req.path, "status": r.status_code,
                           "s": round(time.monotonic() - t0, 3)})
        if r.status_code >= 500 or r.status_code < 200 or 300 <= r.status_code < 400:
            self.server_errors.append(finding(req, r.status_code, r.content))
        elif r.status_code >= 400 and not error_body_ok(r.content):
            self.bad_error_bodies.append(finding(req, r.status_code, r.content))
        elif r.headers.get("content-type", "").startswith("text/event-stream"):
            for err in stream_errors(r.content):
                if err.get("type") == "server_error":
                    self.server_errors.append(finding(req, "200 (in-band error event)", json.dumps(err).encode()))
        return True

    def report(self, elapsed_s: float) -> dict:
        ok = not (self.server_errors or self.crashes or self.bad_error_bodies or self.stopped_early)
        return {"requests": self.sent, "generated": self.generated, "hostile": self.hostile,
                "schema_source": self.schema_source, "by_status": dict(sorted(self.by_status.items())),
                "server_errors": self.server_errors, "bad_error_bodies": self.bad_error_bodies,
                "crashes": self.crashes, "healthy_after": self.healthy_after, "stopped_early": self.stopped_early,
                "elapsed_s": round(elapsed_s, 1), "ok": ok and self.healthy_after}


def finding(req: Request, status: Any, content: bytes) -> dict:
    body = (req.body or b"")[:EXCERPT].decode("utf-8", "backslashreplace")
    return {"case": req.label, "method": req.method, "path": req.path, "status": status,
            "body": content[:EXCERPT].decode("utf-8", "backslashreplace"), "request": body}


def alive(client: httpx.Client, tries: int = 3) -> bool:
    for i in range(tries):
        try:
            return client.get("/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            time.sleep(0.5 * (i + 1))
    return False

"""Prometheus figures, engine-state gauges refreshed on scrape, and JSON access logs."""
from __future__ import annotations

import logging
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("epdlang.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter("epd_http_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("epd_requests_finished", "Engine requests by finish reason",
                                ["finish_reason"], registry=r)
        self.ttft = Histogram("epd_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("epd_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("epd_e2e_request_latency_seconds", "Submit to finish", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter("epd_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("epd_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("epd_generation_tokens", "Generated tokens", registry=r)
        self.engine = {name: Gauge(f"epd_{name}", doc, registry=r) for name, doc in ENGINE_GAUGES.items()}
        self.instance = {name: Gauge(f"epd_instance_{name}", doc, ["instance", "roles"], registry=r)
                         for name, doc in INSTANCE_GAUGES.items()}
        self.router = {name: Gauge(f"epd_router_{name}", doc, registry=r) for name, doc in ROUTER_GAUGES.items()}
        self.placement = Gauge("epd_instance_placement", "1 per instance on Ray: the node it runs on, its address",
                               ["instance", "roles", "node_id", "address"], registry=r)
        self.link_tensors = Gauge("epd_link_tensors", "Tensors relayed per link (shm within a Ray node, tcp across)",
                                  ["src", "dst", "transport"], registry=r)
        self.link_bytes = Gauge("epd_link_bytes", "Bytes of tensors relayed per link", ["src", "dst", "transport"],
                                registry=r)
        self.stage_seconds = Gauge("epd_instance_stage_seconds_total",
                                   "Seconds of forward passes by stage (encode, prefill, mixed, decode) since start",
                                   ["instance", "roles", "stage"], registry=r)
        self.stage_passes = Gauge("epd_instance_stage_passes_total", "Forward passes by stage since start",
                                  ["instance", "roles", "stage"], registry=r)
        self.role_switches = Gauge("epd_role_switches_total", "Instances moved to other roles (--role-switching)",
                                   registry=r)
        self.ready = Gauge("epd_engine_ready", "1 when the engine is loaded and serving", registry=r)
        self._prompt_total = self._cached_total = 0

    def observe(self, ttft: float | None, e2e: float, prompt: int, cached: int, completion: int,
                finish_reason: str | None) -> None:
        """Record one finished engine request."""
        self.finished.labels(finish_reason or "unknown").inc()
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if completion > 1:
                self.tpot.observe((e2e - ttft) / (completion - 1))
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        self._prompt_total += prompt
        self._cached_total += cached
        self.generation_tokens.inc(completion)

    def update_engine(self, snapshot: dict[str, float]) -> None:
        prompt = self._prompt_total
        snapshot = {"prefix_cache_hit_rate": self._cached_total / prompt if prompt else 0.0, **snapshot}
        for name, gauge in self.engine.items():
            if name in snapshot:
                gauge.set(snapshot[name])
        for name, info in snapshot.get("instances", {}).items():
            roles = info.get("roles", "")
            for key, gauge in self.instance.items():
                if key in info:
                    gauge.labels(name, roles).set(info[key])
            for key, value in info.items():
                for prefix, gauge in (("stage_seconds_", self.stage_seconds), ("stage_passes_", self.stage_passes)):
                    if key.startswith(prefix):
                        gauge.labels(name, roles, key[len(prefix):]).set(value)
        for key, gauge in self.router.items():
            gauge.set(snapshot.get(f"router_{key}", 0))
        self.role_switches.set(snapshot.get("router_role_switches", 0))
        if "ray" in snapshot:
            self._update_placement(snapshot)

    def _update_placement(self, snapshot: dict) -> None:
        self.placement.clear()  # an instance restarted elsewhere is shown on its new node only
        for name, info in snapshot.get("instances", {}).items():
            if info.get("node_id"):
                self.placement.labels(name, info.get("roles", ""), info["node_id"], info.get("address", "")).set(1)
        for link in snapshot["ray"]["links"]:
            self.link_tensors.labels(link["src"], link["dst"], link["transport"]).set(link["tensors"])
            self.link_bytes.labels(link["src"], link["dst"], link["transport"]).set(link["bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


INSTANCE_GAUGES = {
    "inflight": "Requests the router has placed on the instance and not seen finish",
    "num_waiting_requests": "Requests queued for prefill on the instance",
    "num_running_requests": "Requests decoding on the instance",
    "kv_usage": "Fraction of the instance's KV pages in use",
    "encode_tokens": "Image tokens of encode jobs sent to the instance and not done",
    "encoder_cache_hit_rate": "Encoder-output cache hits / lookups on the instance",
    "prefix_cache_hit_rate": "Prefix-cache hit rate on the instance",
}
ROUTER_GAUGES = {
    "instance_deaths": "Instance processes that died (each is restarted)",
    "retried": "Requests dispatched again after their instance died before streaming",
    "failed": "Requests failed because their instance died after streaming",
}

ENGINE_GAUGES = {
    "num_waiting_requests": "Requests queued for prefill",
    "num_running_requests": "Requests decoding",
    "kv_used_pages": "KV pages held by requests or the prefix cache",
    "kv_cached_pages": "KV pages owned by the prefix cache",
    "kv_request_pages": "KV pages held by requests and not (yet) by the prefix cache",
    "kv_total_pages": "KV pages in the pool",
    "kv_usage": "Fraction of KV pages in use",
    "prefix_cache_hit_rate": "Prompt tokens found in the prefix cache / prompt tokens looked up",
    "encoder_cache_hit_rate": "Encoder-output cache hits / lookups",
    "num_preemptions": "Requests preempted so far",
}


class AccessLogMiddleware:
    """Counts every HTTP request by endpoint and status and writes one JSON log line for it."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            path = scope["path"]
            endpoint = path if path in self.endpoints else "other"
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
            client = scope.get("client") or ("", 0)
            access_log.info(orjson.dumps({
                "ts": round(time.time(), 3), "method": scope["method"], "path": path, "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 2), "client": f"{client[0]}:{client[1]}",
            }).decode())

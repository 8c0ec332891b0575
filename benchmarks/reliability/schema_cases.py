"""Requests generated from the server's OpenAPI schema with schemathesis (v4 Python API) and Hypothesis.

Generation is seeded and happens before anything is sent, so a seed names one list of requests, whatever the
server answers. Operations without a body (the GET routes) have one distinct case, which they get (their negative
mode has none); the rest of the budget is split evenly over the operations with a JSON body, half in
positive mode (bodies that fit the schema) and half in negative mode (bodies that do not).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlencode

import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.errors import LoaderError
from schemathesis.specs.openapi.schemas import OpenApiSchema

from benchmarks.reliability.fuzz import Request

MODEL_ROUTES = ("/v1/chat/completions", "/v1/completions")  # bodies with a `model` field that must match
DROPPED_HEADERS = ("user-agent", "x-schemathesis-testcaseid")


def load_schema(url: str, auth: dict[str, str]) -> tuple[OpenApiSchema, str]:
    """The schema the server serves at /openapi.json; if it serves none, the same app's schema built here."""
    config = schemathesis.Config()
    try:
        return schemathesis.openapi.from_url(f"{url}/openapi.json", config=config, headers=auth, timeout=30), \
            "served /openapi.json"
    except LoaderError:
        from runtime.server.app import create_app
        from runtime.server.config import ServerConfig

        app = create_app(ServerConfig(model_path="fuzz", served_model_name="fuzz"))
        return schemathesis.openapi.from_dict(app.openapi(), config=config), \
            "runtime.server.app's schema, built locally (the server does not serve /openapi.json)"


def generated_requests(schema: OpenApiSchema, total: int, seed_: int, model: str,
                       auth: dict[str, str]) -> list[Request]:
    """About `total` requests over every operation of `schema`, in operation order."""
    if total <= 0:
        return []
    ops = [r.ok() for r in schema.get_all_operations()]
    bodies = sum(1 for op in ops if op.body)
    budgets = split(total - (len(ops) - bodies), 2 * bodies)  # per (operation with a body, mode)
    out: list[Request] = []
    for i, op in enumerate(ops):
        for j, mode in enumerate((GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):
            cases = generate(op, mode, next(budgets) if op.body else 1, seed_ * 1000 + 2 * i + j)
            for k, case in enumerate(cases):
                if mode.is_positive and k % 2 == 0 and op.path in MODEL_ROUTES and isinstance(case.body, dict):
                    case.body["model"] = model  # half the valid bodies name the served model, to reach the engine
                out.append(to_request(case, f"{mode.value}:{op.label}", auth))
    return out


def split(total: int, parts: int) -> Iterator[int]:
    """`total` in `parts` near-equal shares, each at least 1."""
    base, extra = divmod(max(total, parts), max(parts, 1))
    for i in range(parts):
        yield base + (i < extra)


def generate(op: schemathesis.APIOperation, mode: GenerationMode, count: int, seed_: int) -> list:
    """Up to `count` distinct cases of `op` in `mode` (fewer where the schema allows fewer, none where it allows
    none: a GET route has no invalid form)."""
    cases: list = []

    @seed(seed_)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(op.as_strategy(generation_mode=mode))
    def collect(case: schemathesis.Case) -> None:
        cases.append(case)

    try:
        collect()
    except Unsatisfiable:
        pass
    return cases[:count]


def to_request(case: schemathesis.Case, label: str, auth: dict[str, str]) -> Request:
    kw = case.as_transport_kwargs(base_url="http://fuzz.invalid", headers=auth)
    headers = {k: str(v) for k, v in kw["headers"].items() if k.lower() not in DROPPED_HEADERS}
    if "json" in kw:
        body: bytes | None = json.dumps(kw["json"]).encode()
    else:
        data = kw.get("data")
        body = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    path = case.formatted_path + (f"?{urlencode(kw['params'], doseq=True)}" if kw.get("params") else "")
    return Request(label, case.method.upper(), path, body, headers)

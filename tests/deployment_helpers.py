"""Running requests through a `Deployment` from synchronous tests, and looking at what it left behind."""
from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from epdlang.sampling import SamplingParams
from runtime.cluster.deployment import Deployment
from runtime.messages import GenerateRequest, RequestOutput

ENGINE_ARGS = {"page_size": 8, "kv_cache_bytes": 32 << 20}


def prepare(dep: Deployment, request: dict, params: SamplingParams, rid: str | None = None) -> GenerateRequest:
    prepared = dep.processor.prepare(request.get("messages"), prompt=request.get("prompt"),
                                     images=request.get("images", ()))
    return GenerateRequest(rid or uuid.uuid4().hex, prepared.input_ids, prepared.images, params,
                           session_id=request.get("session_id"))


async def collect(dep: Deployment, msg: GenerateRequest) -> list[RequestOutput] | BaseException:
    try:
        return [out async for out in dep.generate(msg)]
    except Exception as exc:  # typed admission errors come back as the result
        return exc


def run_all(dep: Deployment, msgs: list[GenerateRequest], timeout_s: float = 120) -> list[Any]:
    async def go():
        return await asyncio.wait_for(asyncio.gather(*(collect(dep, m) for m in msgs)), timeout_s)

    return asyncio.run(go())


def tokens(outs: list[RequestOutput]) -> tuple[int, ...]:
    return tuple(t for out in outs for t in out.new_token_ids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False

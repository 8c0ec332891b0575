"""Instances killed mid-run (SIGKILL): no hang, a clear error or a transparent retry, a restart, and the
deployment keeps answering. Shutdown leaves no process and no shared-memory segment."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from deployment_helpers import ENGINE_ARGS, alive, collect, prepare, run_all, tokens
from epdlang.errors import EpdError, RequestAborted
from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.deployment import Deployment
from runtime.cluster.transfer import list_segments

LONG = SamplingParams(max_new_tokens=400, ignore_eos=True)
SHORT = SamplingParams(max_new_tokens=8, ignore_eos=True)


def _request(color: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": make_image(color, (112, 112))},
                                                      {"type": "text", "text": "Describe it."}]}]}


@pytest.fixture(scope="module")
def dep(tiny_model_dir):
    with Deployment(tiny_model_dir, "E,P,D", **ENGINE_ARGS) as d:
        yield d


async def _first_tokens(dep: Deployment, msg) -> tuple[asyncio.Queue, asyncio.Task]:
    """Start streaming `msg`; the queue gets each delta, the task ends with the stream."""
    q: asyncio.Queue = asyncio.Queue()

    async def run():
        async for out in dep.generate(msg):
            q.put_nowait(out)

    return q, asyncio.ensure_future(run())


def _wait_restarted(dep: Deployment, name: str, old_pid: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dep.pids().get(name, old_pid) != old_pid and name in dep.router.views:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} was not restarted within {timeout_s}s")


def test_decode_instance_killed_while_streaming(dep):
    msgs = [prepare(dep, _request(c), LONG) for c in ("red", "blue")]

    async def scenario():
        streams = [await _first_tokens(dep, m) for m in msgs]
        for q, _ in streams:  # both have streamed tokens, so they cannot be retried
            await asyncio.wait_for(q.get(), 30)
            await asyncio.wait_for(q.get(), 30)
        os.kill(dep.pids()["D0"], signal.SIGKILL)
        killed = time.monotonic()
        for q, task in streams:
            await asyncio.wait_for(task, 5)
            last = None
            while not q.empty():
                last = q.get_nowait()
            assert last.finished and last.finish_reason == "error" and "D0" in last.error
        return time.monotonic() - killed

    old = dep.pids()["D0"]
    assert asyncio.run(scenario()) < 5
    _wait_restarted(dep, "D0", old)
    [outs] = run_all(dep, [prepare(dep, _request("green"), SHORT)], 60)
    assert len(tokens(outs)) == 8 and outs[-1].error is None


def test_prefill_instance_killed_before_first_token_is_retried(dep):
    reference = asyncio.run(collect(dep, prepare(dep, _request("orange"), SHORT)))
    msgs = [prepare(dep, _request("orange"), SHORT) for _ in range(3)]
    msgs += [prepare(dep, _request(c), SHORT) for c in ("white", "black", "gray")]
    old = dep.pids()["P0"]

    async def scenario():
        tasks = [asyncio.ensure_future(collect(dep, m)) for m in msgs]
        await asyncio.sleep(0)
        os.kill(old, signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 90)

    retried_before = dep.snapshot_now().get("router_retried", 0)
    results = asyncio.run(scenario())
    for outs in results:  # P died before any first token: every request is retried and answered
        assert not isinstance(outs, BaseException), outs
        assert outs[-1].error is None and len(tokens(outs)) == 8
    assert all(tokens(outs) == tokens(reference) for outs in results[:3])
    assert dep.snapshot_now()["router_retried"] - retried_before == len(msgs)
    _wait_restarted(dep, "P0", old)


def test_encoder_killed_then_requests_still_answered(dep):
    old = dep.pids()["E0"]
    os.kill(old, signal.SIGKILL)
    results = run_all(dep, [prepare(dep, _request(c), SHORT) for c in ("pink", "brown")], 90)
    for outs in results:
        assert not isinstance(outs, BaseException) and outs[-1].error is None
        assert len(tokens(outs)) == 8
    _wait_restarted(dep, "E0", old)


def test_a_request_the_router_cannot_send_fails_instead_of_hanging(dep):
    """A value the wire codec cannot encode (a seed past 64 bits, say) used to leave the request waiting
    forever; now the router answers it with an error and keeps serving."""
    bad = prepare(dep, _request("red"), SamplingParams(max_new_tokens=2, seed=2**70))
    result = asyncio.run(asyncio.wait_for(collect(dep, bad), 10))
    assert isinstance(result, EpdError) and "could not handle" in str(result)
    [outs] = run_all(dep, [prepare(dep, _request("red"), SHORT)], 60)
    assert outs[-1].error is None and len(tokens(outs)) == 8


def test_shutdown_leaves_nothing(tiny_model_dir):
    dep = Deployment(tiny_model_dir, "EP,D", **ENGINE_ARGS)
    pids, prefix = list(dep.pids().values()), dep.segment_prefix
    msgs = [prepare(dep, _request(c), LONG) for c in ("red", "blue", "green")]

    async def scenario():  # shut down with requests in flight, handoffs and all
        tasks = [asyncio.ensure_future(collect(dep, m)) for m in msgs]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(dep.shutdown)
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    results = asyncio.run(scenario())
    assert all(isinstance(r, BaseException) or r[-1].finished for r in results)
    assert not any(alive(pid) for pid in pids)
    assert list_segments(prefix) == []
    assert not dep.is_alive()
    late = asyncio.run(asyncio.wait_for(collect(dep, prepare(dep, _request("red"), SHORT)), 5))
    assert isinstance(late, RequestAborted)  # refused at once: no hang, no write to a closed (reused) fd
    with pytest.raises(RequestAborted):
        dep.snapshot_now(timeout_s=5)

"""Outputs from the router thread to asyncio readers: one loop wake-up per burst, order kept, and deltas that
queued up while a reader was busy come to it as one."""
from __future__ import annotations

import asyncio
import threading
import time

from deployment_helpers import ENGINE_ARGS, prepare, tokens
from epdlang.sampling import SamplingParams
from images import make_image
from runtime.cluster.deployment import Deployment
from runtime.cluster.mailbox import LoopMailbox
from runtime.engine.core import Engine
from runtime.messages import RequestOutput


def test_a_burst_from_another_thread_arrives_in_order_with_one_wake_up():
    async def main() -> tuple[list, list, int]:
        loop = asyncio.get_running_loop()
        box, a, b = LoopMailbox(loop), asyncio.Queue(), asyncio.Queue()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counting(*args):
            nonlocal wakes
            wakes += 1
            return real(*args)

        loop.call_soon_threadsafe = counting
        # the loop stays busy (this thread sleeps without yielding) while the burst is posted
        burst = threading.Thread(target=lambda: [box.put(a if i % 2 else b, i) for i in range(200)])
        burst.start()
        burst.join(10)
        got_a = [await asyncio.wait_for(a.get(), 10) for _ in range(100)]
        got_b = [await asyncio.wait_for(b.get(), 10) for _ in range(100)]
        return got_a, got_b, wakes

    got_a, got_b, wakes = asyncio.run(main())
    assert got_a == list(range(1, 200, 2)) and got_b == list(range(0, 200, 2))
    assert wakes == 1


def test_items_posted_after_a_drain_wake_the_loop_again():
    async def main() -> list:
        box, q = LoopMailbox(asyncio.get_running_loop()), asyncio.Queue()
        got = []
        for i in range(3):
            threading.Thread(target=box.put, args=(q, i)).start()
            got.append(await asyncio.wait_for(q.get(), 10))
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_closed_loop_is_not_an_error_for_the_sender():
    loop = asyncio.new_event_loop()
    box = LoopMailbox(loop)
    loop.close()
    box.put(asyncio.Queue(), "late")  # the router thread must not die on a reader that is gone
    box.put(asyncio.Queue(), "later")


def test_then_joins_two_deltas():
    a = RequestOutput("r", (1, 2), "ab", prompt_tokens=5, completion_tokens=2, prompt_logprobs=(None,))
    b = RequestOutput("r", (3,), "c", finished=True, finish_reason="length", prompt_tokens=5, completion_tokens=3)
    joined = a.then(b)
    assert (joined.new_token_ids, joined.new_text, joined.finished, joined.finish_reason) == ((1, 2, 3), "abc",
                                                                                               True, "length")
    assert (joined.completion_tokens, joined.prompt_logprobs) == (3, (None,))


def test_a_reader_that_fell_behind_gets_the_queued_deltas_as_one(tiny_model_dir):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    request = {"messages": [{"role": "user", "content": [{"type": "image", "image": make_image("purple", (112, 112))},
                                                         {"type": "text", "text": "Tell a story."}]}]}
    expected = Engine(tiny_model_dir, **ENGINE_ARGS).generate(dict(request), params)[0].token_ids
    with Deployment(tiny_model_dir, "EPD", **ENGINE_ARGS) as dep:
        msg = prepare(dep, request, params, rid="slow")

        async def slow_reader() -> list[RequestOutput]:
            stream = dep.generate(msg)
            outs = [await stream.__anext__()]
            deadline = time.monotonic() + 60
            while "slow" in dep.router.flights and time.monotonic() < deadline:
                time.sleep(0.05)  # blocks the loop, as a busy server would, while the engine finishes
            outs += [out async for out in stream]
            return outs

        outs = asyncio.run(asyncio.wait_for(slow_reader(), 120))
    assert tokens(outs) == expected and len(expected) == 40
    assert outs[-1].finished and outs[-1].completion_tokens == 40
    assert len(outs) <= 3  # the first delta, then what queued (the last may land just after the rest)

"""`benchmarks/engine_offline.py`'s closed loop: never more than C requests in flight, every one finished."""
from __future__ import annotations

import sys
from pathlib import Path

from epdlang.sampling import SamplingParams
from runtime.engine.core import Engine

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the offline scripts import their `offline_kit`

import engine_offline  # noqa: E402


def test_closed_loop_keeps_at_most_c_in_flight_and_finishes_every_request(tiny_model_dir):
    engine = Engine(tiny_model_dir, enable_prefix_cache=False)
    tok = engine.processor.tokenizer
    reqs = [engine_offline.image_request(engine_offline.synthetic_image(i, (56, 56)),
                                         engine_offline.text_of_tokens(tok, 4, i)) for i in range(5)]
    in_flight, peak = set(), 0
    add, step = engine.add_request, engine.step

    def counting_add(**kw):
        nonlocal peak
        rid = add(**kw)
        in_flight.add(rid)
        peak = max(peak, len(in_flight))
        return rid

    def counting_step():
        outs = step()
        in_flight.difference_update(o.rid for o in outs if o.finished)
        return outs

    engine.add_request, engine.step = counting_add, counting_step
    tokens = engine_offline.closed_loop(engine, reqs, SamplingParams(max_new_tokens=3, ignore_eos=True), 2)
    assert tokens == 5 * 3
    assert peak == 2 and not in_flight and not engine.has_unfinished()

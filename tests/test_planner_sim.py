"""The planner's simulator against queueing cases worked out by hand (one stage, known service times)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from runtime.config import Slo
from runtime.planner.clock import Clock
from runtime.planner.sim import Budgets, SimRequest, Simulation

LOOSE = Slo(ttft_ms=1e9, tpot_ms=1e9)
EPD = [("EPD0", frozenset("EPD"), 1)]


@dataclass
class Fixed:
    """Constant service times, so that every wait can be computed by hand."""

    encode: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    transfer: float = 0.0
    kv_bytes_per_token: int = 0
    embed_bytes_per_token: int = 0
    stream_ms_per_token: float = 0.0
    client_ms_per_token: float = 0.0
    decode_context: str = "mean"

    def encode_ms(self, image_tokens, threads):
        return self.encode * len(image_tokens)

    def prefill_ms(self, tokens, threads):
        return self.prefill

    def decode_ms(self, batch, context, threads):
        return self.decode

    def transfer_ms(self, nbytes):
        return self.transfer


def requests(arrivals, output_len=1, images=(), prompt_len=10):
    return [SimRequest(a, tuple(images), prompt_len, output_len) for a in arrivals]


def one_at_a_time(prompt_len=10):
    return Budgets(prefill_token_budget=prompt_len, encode_token_budget=1, max_running=256)


def test_fifo_waits_of_a_deterministic_single_server_queue():
    # D/D/1: arrivals every 50 ms, service 100 ms, one request per batch. Request i starts when
    # request i-1 ends, at 100 i, so its TTFT is 100 (i + 1) - 50 i = 100 + 50 i.
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(), cores=None)
    out = sim.run(requests([50.0 * i for i in range(6)]), LOOSE)
    assert out.ttft_ms == pytest.approx([100, 150, 200, 250, 300, 350], abs=1e-9)
    assert out.finished == out.total == 6


def test_an_idle_server_serves_each_arrival_at_once():
    # arrivals 200 ms apart, service 100 ms: nobody waits.
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(), cores=None)
    assert sim.run(requests([0, 200, 400]), LOOSE).ttft_ms == pytest.approx([100] * 3, abs=1e-9)


def test_a_token_budget_of_two_prompts_batches_them():
    # budget 20 tokens = two 10-token prompts per step of 100 ms; four arrive at t=0, one after the
    # other: the first step starts with the first alone (as the engine would) and ends at 100; the
    # next two share the step [100, 200]; the last runs [200, 300].
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(20), cores=None)
    assert sim.run(requests([0, 0, 0, 0]), LOOSE).ttft_ms == pytest.approx([100, 200, 200, 300], abs=1e-9)


def test_a_long_prompt_is_chunked_by_the_budget():
    # 25 tokens with a 10-token budget: three steps of 100 ms -> first token at 300.
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(10), cores=None)
    assert sim.run(requests([0], prompt_len=25), LOOSE).ttft_ms == pytest.approx([300], abs=1e-9)


def test_decode_steps_give_the_inter_token_gaps_and_tpot():
    # prefill 100, then 4 decode steps of 20 ms each: tokens at 100, 120, 140, 160, 180.
    sim = Simulation(EPD, Fixed(prefill=100.0, decode=20.0), one_at_a_time(), cores=None)
    out = sim.run(requests([0], output_len=5), Slo(100.0, 20.0))
    assert out.ttft_ms == pytest.approx([100], abs=1e-9)
    assert out.tpot_ms == pytest.approx([20], abs=1e-9)
    assert out.met == 1
    assert sim.run(requests([0], output_len=5), Slo(99.0, 20.0)).met == 0  # a fresh sim misses TTFT by 1 ms


def test_a_prefill_joins_the_decode_step():
    # Two requests, both 3 tokens. A at 0: prefill [0,100]. B at 50 waits; step 2 = decode A + prefill B
    # = 20 + 100 -> B's first token and A's second at 220; step 3 decodes both: 240.
    sim = Simulation(EPD, Fixed(prefill=100.0, decode=20.0), one_at_a_time(), cores=None)
    out = sim.run(requests([0, 50], output_len=3), LOOSE)
    assert out.ttft_ms == pytest.approx([100, 170], abs=1e-9)
    flights = sim.flights
    assert flights[0].tokens == pytest.approx([100, 220, 240], abs=1e-9)
    assert flights[1].tokens == pytest.approx([220, 240, 260], abs=1e-9)


def test_passes_and_their_seconds_are_counted_per_instance_and_stage_as_the_engines_metrics():
    # The timeline above: a prefill [0,100], a mixed step [100,220], decode steps [220,240] and [240,260].
    # With an image on a separate E: one encode pass of 30 ms there.
    sim = Simulation(EPD, Fixed(prefill=100.0, decode=20.0), one_at_a_time(), cores=None)
    stages = sim.run(requests([0, 50], output_len=3), LOOSE).stages
    assert stages == {"EPD0": {"prefill": (1, pytest.approx(0.1)), "mixed": (1, pytest.approx(0.12)),
                               "decode": (2, pytest.approx(0.04))}}
    nodes = [("E0", frozenset("E"), 1), ("PD0", frozenset("PD"), 1)]
    sim = Simulation(nodes, Fixed(encode=30.0, prefill=100.0), one_at_a_time(), cores=None)
    stages = sim.run(requests([0], images=(4,)), LOOSE).stages
    assert stages == {"E0": {"encode": (1, pytest.approx(0.03))}, "PD0": {"prefill": (1, pytest.approx(0.1))}}


def test_encode_then_prefill_on_separate_instances_with_transfers():
    # E encodes one image in 30 ms, the embedding travels 5 ms, P prefills in 100 ms (P-only), the KV
    # travels 5 ms, D decodes in 20 ms: first token at 5 + 30 + 5 + 100 = 140 (pixels travel 5 too),
    # second at 140 + 5 + 20 = 165.
    nodes = [("E0", frozenset("E"), 1), ("P0", frozenset("P"), 1), ("D0", frozenset("D"), 1)]
    sim = Simulation(nodes, Fixed(encode=30.0, prefill=100.0, decode=20.0, transfer=5.0), one_at_a_time(),
                     cores=None)
    sim.run(requests([0], output_len=2, images=(4,)), LOOSE)
    assert sim.flights[0].tokens == pytest.approx([140, 165], abs=1e-9)


def test_two_encoders_split_a_requests_images():
    # Two images, two E instances: encoded in parallel (30 ms), not one after the other (60 ms).
    nodes = [("E0", frozenset("E"), 1), ("E1", frozenset("E"), 1), ("PD0", frozenset("PD"), 1)]
    sim = Simulation(nodes, Fixed(encode=30.0, prefill=100.0), one_at_a_time(), cores=None)
    assert sim.run(requests([0], images=(4, 4)), LOOSE).ttft_ms == pytest.approx([130], abs=1e-9)


def test_a_full_client_holds_requests_back():
    # max_concurrency 1: the second request is only sent when the first finishes (t=100), so its TTFT
    # from its own send is 100, not 200.
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(), cores=None, max_concurrency=1)
    assert sim.run(requests([0, 0]), LOOSE).ttft_ms == pytest.approx([100, 100], abs=1e-9)


def test_the_front_end_is_one_fifo_thread():
    # 10 ms of preprocessing each, three at t=0: dispatched at 10, 20, 30; prefill 5 ms each, one at a time.
    reqs = [SimRequest(0.0, (), 10, 1, front_ms=10.0) for _ in range(3)]
    sim = Simulation(EPD, Fixed(prefill=5.0), one_at_a_time(), cores=None)
    assert sim.run(reqs, LOOSE).ttft_ms == pytest.approx([15, 25, 35], abs=1e-9)


def test_processor_sharing_slows_jobs_that_overlap_on_too_few_cores():
    # Two 1-thread jobs of 100 ms on one core, started together: both end at 200.
    # Started 50 ms apart: the first runs alone 50 ms, then both at half speed: it ends at 150,
    # the second has 50 ms done then and ends alone at 200.
    for gap, ends in ((0.0, [200, 200]), (50.0, [150, 200])):
        assert overlapping_jobs(gap) == pytest.approx(ends, abs=1e-9)


def overlapping_jobs(gap: float) -> list[float]:
    clock, done = Clock(cores=1), []
    clock.start(100.0, 1, lambda: done.append(clock.now))
    clock.at(gap, lambda: clock.start(100.0, 1, lambda: done.append(clock.now)))
    clock.run()
    return done


def test_attainment_counts_requests_that_never_finished_as_misses():
    sim = Simulation(EPD, Fixed(prefill=100.0), one_at_a_time(), cores=None)
    out = sim.run(requests([0, 0, 0]), Slo(150.0, 1e9), horizon_ms=250.0)
    assert (out.met, out.finished, out.total) == (1, 2, 3)
    assert out.attainment == pytest.approx(1 / 3)


def streaming(stream_ms: float, client_ms: float = 0.0) -> Fixed:
    costs = Fixed(prefill=100.0, decode=20.0)
    costs.stream_ms_per_token, costs.client_ms_per_token = stream_ms, client_ms
    return costs


def test_tokens_reach_the_client_after_the_api_server_streams_them_and_the_client_parses_them():
    # 10 ms preprocessing, 2 ms per token on the event loop, 5 ms per token in the client. Prefill [10, 110]
    # -> the first token is streamed [110, 112] and parsed [112, 117]; the decode step [110, 130] -> the
    # second is streamed [130, 132] and parsed [132, 137].
    sim = Simulation(EPD, streaming(2.0, 5.0), one_at_a_time(), cores=None)
    sim.run([SimRequest(0.0, (), 10, 2, front_ms=10.0)], LOOSE)
    assert sim.flights[0].tokens == pytest.approx([117, 137], abs=1e-9)


def test_streaming_does_not_hold_back_the_next_requests_preprocessing():
    # 50 ms per streamed token. Request 1: preprocessed [0, 10], prefill [10, 110], its tokens streamed
    # [110, 160] and [160, 210] (the decode step [110, 130] ends it). Request 2 arrives at 120 and is
    # preprocessed at once on its own thread [120, 130]; prefill [130, 230]; its token waits for the event
    # loop, free at 210, and is streamed [230, 280]: TTFT 160. (With one thread for both it would be 200.)
    sim = Simulation(EPD, streaming(50.0), one_at_a_time(), cores=None)
    reqs = [SimRequest(0.0, (), 10, 2, front_ms=10.0), SimRequest(120.0, (), 10, 1, front_ms=10.0)]
    assert sim.run(reqs, LOOSE).ttft_ms == pytest.approx([160, 160], abs=1e-9)


def test_on_accelerators_a_hybrids_encoder_and_lm_share_its_device_only():
    # GPU mode: jobs on one instance's device share it; jobs on two devices do not slow each other.
    clock, done = Clock(cores=None), []
    a, b = object(), object()
    clock.start(100.0, 1, lambda: done.append(("a1", clock.now)), a)
    clock.start(100.0, 1, lambda: done.append(("a2", clock.now)), a)
    clock.start(100.0, 1, lambda: done.append(("b", clock.now)), b)
    clock.run()
    assert sorted(done) == [("a1", pytest.approx(200.0)), ("a2", pytest.approx(200.0)), ("b", pytest.approx(100.0))]


@dataclass
class ByContext(Fixed):
    """A decode step costs its context in ms; `decode_context` says which context the backend pays for."""

    def decode_ms(self, batch, context, threads):
        return float(context)


def test_a_padded_decode_step_costs_the_longest_context_and_a_ragged_one_the_mean():
    # A 10-token prompt is prefilled alone [0, 100]. A 30-token one arrives at 50 and is prefilled beside the
    # first one's decode step (context 11): [100, 211]. The next step decodes both, at contexts 12 and 31:
    # padded (as our CPU SDPA pads every row) it costs the longest, 31 ms; ragged, the mean, 21 ms.
    reqs = [SimRequest(0.0, (), 10, 3), SimRequest(50.0, (), 30, 2)]
    for padding, third in (("max", 242.0), ("mean", 232.0)):
        sim = Simulation(EPD, ByContext(prefill=100.0, decode_context=padding), one_at_a_time(40), cores=None)
        sim.run(reqs, LOOSE)
        assert [f.tokens for f in sim.flights] == [pytest.approx([100, 211, third]), pytest.approx([211, third])]


def test_a_few_decode_rows_wait_for_the_encoder_beside_them_as_the_engine_does():
    # Four cores, so nothing shares. A (text, 1 row) prefills [0, 10] and decodes every 10 ms. B's image
    # arrives at 25, inside A's step [20, 30]; the engine schedules encodes at a step's start, so it encodes
    # [30, 130] beside A's steps (overlap on). With a 60 ms wait, the step after the one ending at 30 waits
    # until 90 (ends 100); the next waits for the encode, which ends at 130, when A's row rides in B's
    # prefill: [130, 150]. Without the wait A never waits.
    def token_times(wait_ms):
        sim = Simulation(EPD, Fixed(encode=100.0, prefill=10.0, decode=10.0),
                         Budgets(encode_token_budget=64, decode_wait_ms=wait_ms, overlap_encode=True), cores=4)
        sim.run([SimRequest(0.0, (), 10, 8), SimRequest(25.0, (64,), 10, 2)], LOOSE)
        return [f.tokens for f in sim.flights]

    (a, b) = token_times(60.0)
    assert a == pytest.approx([10, 20, 30, 100, 150, 160, 170, 180], abs=1e-9)
    assert b == pytest.approx([150, 160], abs=1e-9)
    (a, b) = token_times(0.0)
    assert a == pytest.approx([10, 20, 30, 40, 50, 60, 70, 80], abs=1e-9)


@dataclass
class PerToken(Fixed):
    """Prefill at `prefill` ms per prompt token."""

    def prefill_ms(self, tokens, threads):
        return self.prefill * tokens


@pytest.mark.parametrize("mixed, a_tokens, b_first", [
    # A (10 tokens, 4 out) prefills alone [0, 100]. B (30 tokens) arrives at 50. Without a mixed budget,
    # step 2 decodes A beside all of B: 20 + 300 -> 420; then 440, 460.
    (None, [100, 420, 440, 460], 420),
    # With 10 tokens beside decode rows, B takes three steps of 20 + 100 ms: A's gaps stay 120.
    (10, [100, 220, 340, 460], 460),
])
def test_a_mixed_budget_chunks_the_prefill_that_decoding_requests_ride_in(mixed, a_tokens, b_first):
    budgets = Budgets(prefill_token_budget=30, encode_token_budget=1, max_running=256, mixed_token_budget=mixed)
    sim = Simulation(EPD, PerToken(prefill=10.0, decode=20.0), budgets, cores=None)
    sim.run([SimRequest(0.0, (), 10, 4), SimRequest(50.0, (), 30, 3)], LOOSE)
    a, b = sim.flights
    assert a.tokens == pytest.approx(a_tokens, abs=1e-9)
    assert b.tokens[0] == pytest.approx(b_first, abs=1e-9)


def test_a_mixed_budget_leaves_a_prompt_alone_unchunked():
    budgets = Budgets(prefill_token_budget=30, encode_token_budget=1, max_running=256, mixed_token_budget=10)
    sim = Simulation(EPD, PerToken(prefill=10.0), budgets, cores=None)
    assert sim.run([SimRequest(50.0, (), 30, 1)], LOOSE).ttft_ms == pytest.approx([300], abs=1e-9)


def overlap_tokens(mode, wait_ms=0.0, encode=100.0, images=((25.0, 2),), a_len=8):
    """A (text, `a_len` tokens) from 0 beside image requests (arrival, output_len), on 4 cores: nothing shares."""
    sim = Simulation(EPD, Fixed(encode=encode, prefill=10.0, decode=10.0),
                     Budgets(encode_token_budget=64, decode_wait_ms=wait_ms, overlap_encode=mode), cores=4)
    reqs = [SimRequest(0.0, (), 10, a_len)] + [SimRequest(at, (64,), 10, out) for at, out in images]
    sim.run(reqs, LOOSE)
    return [f.tokens for f in sim.flights]


def test_an_encode_inside_the_step_makes_the_lm_wait_then_runs_the_pass_planned_before_it():
    # A prefills [0, 10] and decodes every 10 ms. B's image arrives at 25, inside A's step [20, 30], and is
    # scheduled at the next step's start. Beside (overlap on) it encodes [30, 130] while A decodes on to 80;
    # B prefills [130, 140] and decodes [140, 150]. Inside (overlap off) the LM waits for it: A's row then
    # runs alone [130, 140] (the step was planned before B's image was ready), and rides in B's prefill
    # [140, 160].
    (a, b) = overlap_tokens(True)
    assert a == pytest.approx([10, 20, 30, 40, 50, 60, 70, 80], abs=1e-9)
    assert b == pytest.approx([140, 150], abs=1e-9)
    (a, b) = overlap_tokens(False)
    assert a == pytest.approx([10, 20, 30, 140, 160, 170, 180, 190], abs=1e-9)
    assert b == pytest.approx([160, 170], abs=1e-9)


def test_auto_moves_the_encodes_inside_once_the_tower_has_most_of_the_recent_pass_time():
    # The engine's own rule on the simulated clock. A's single row waits up to 50 ms after each decode pass
    # for the encode beside it, so while B1's 2 s encode runs beside, the LM passes take 10 ms of every
    # 60: the tower then has about 70% of the recent pass time (both sums start at 1 s and halve every
    # 10 s), over the 62% that keeps it beside. B2's encode runs inside: A gets no token for its 2 s.
    a, _, _ = overlap_tokens("auto", wait_ms=50.0, encode=2000.0, images=((5.0, 1), (5.0, 1)), a_len=80)
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert a[3] < 2000.0  # decoding beside B1's encode
    assert max(gaps) >= 2000.0  # waiting for B2's, inside
    a, _, _ = overlap_tokens(True, wait_ms=50.0, encode=2000.0, images=((5.0, 1), (5.0, 1)), a_len=80)
    assert max(y - x for x, y in zip(a, a[1:])) <= 60.0 + 1e-9

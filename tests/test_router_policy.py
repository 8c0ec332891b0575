"""The router's choices as pure logic: encoder placement, prefix-aware prefill, page-aware decode."""
from __future__ import annotations

from runtime.cluster.router_policy import InstanceView, LruSet, chunk_chain, pick_decode, pick_prefill, plan_encodes


def _view(name: str, roles: str = "E", **kw) -> InstanceView:
    return InstanceView(name, frozenset(roles), **kw)


def test_new_images_of_one_request_spread_over_encoders():
    e0, e1 = _view("E0"), _view("E1")
    plan = plan_encodes([("a", 100), ("b", 100), ("c", 100), ("d", 100)], [e0, e1])
    assert sorted(v.name for v in plan.values()) == ["E0", "E0", "E1", "E1"]


def test_cached_image_goes_to_its_holder_even_if_busy():
    e0, e1 = _view("E0", encode_tokens=10_000), _view("E1")
    e0.images.add("a")
    plan = plan_encodes([("a", 100), ("b", 100)], [e0, e1])
    assert plan["a"] is e0 and plan["b"] is e1


def test_duplicate_images_planned_once_and_no_encoders_plans_nothing():
    e0 = _view("E0")
    assert list(plan_encodes([("a", 5), ("a", 5)], [e0])) == ["a"]
    assert plan_encodes([("a", 5)], []) == {}


def test_chunk_chain_depends_on_everything_before():
    a = chunk_chain([1, 2, 3, 4, 5, 6, 7], 2)
    b = chunk_chain([9, 2, 3, 4], 2)
    assert len(a) == 3 and len(b) == 2
    assert a[1] != b[1]  # same page content, different prefix
    assert chunk_chain([1, 2, 3, 4], 2) == a[:2]


def test_prefill_prefers_longest_cached_prefix_then_load():
    chain = chunk_chain(list(range(64)), 16)
    p0, p1 = _view("P0", "P", inflight=5), _view("P1", "P")
    for h in chain[:3]:
        p0.chunks.add(h)
    p1.chunks.add(chain[1])  # a later chunk alone does not count: prefixes must be contiguous
    assert pick_prefill([p0, p1], chain) is p0
    assert pick_prefill([p0, p1], chunk_chain(list(range(100, 164)), 16)) is p1  # no hit: least loaded
    assert pick_prefill([], chain) is None


def test_prefill_affinity_yields_to_an_idle_instance():
    """A P with no cached prefix (say, just switched to P) still gets shared-prefix traffic once the
    instance holding the prefix is far ahead in load."""
    chain = chunk_chain(list(range(64)), 16)
    warm, cold = _view("P0", "P", inflight=8), _view("P1", "P")
    for h in chain:
        warm.chunks.add(h)
    assert pick_prefill([warm, cold], chain) is warm  # within BALANCE_ABS of the least loaded
    warm.inflight = 9
    assert pick_prefill([warm, cold], chain) is cold
    cold.inflight = 8  # both busy: 9 is within 1.5x of 8, so affinity wins again
    assert pick_prefill([warm, cold], chain) is warm


def test_decode_prefers_free_pages_then_load():
    d0, d1 = _view("D0", "D", free_pages=1000), _view("D1", "D", free_pages=100)
    assert pick_decode([d0, d1]) is d0
    d1.free_pages, d0.inflight = 1010, 3  # about equal pages: the less loaded wins
    assert pick_decode([d0, d1]) is d1


def test_lru_set_is_bounded():
    s = LruSet(2)
    for k in "abc":
        s.add(k)
    assert "a" not in s and "b" in s and len(s) == 2
    s.add("b")
    s.add("d")
    assert "b" in s and "c" not in s


def test_router_keeps_a_session_on_its_instances_until_it_ends():
    from runtime.cluster.router import Flight, Router
    from runtime.messages import GenerateRequest

    router = Router(sock=None, transfer=None, page_size=4, image_token_id=0, reap=list)
    p0, p1 = _view("P0", "PD"), _view("P1", "PD", inflight=9)
    router.views = {"P0": p0, "P1": p1}
    flight = Flight(GenerateRequest("r", (1, 2, 3), session_id="s"), sink=print, chain=[])
    assert router._choose_prefill(flight) is p0  # no session yet: least loaded
    router.sessions["s"] = ("P1", "P1")
    assert router._choose_prefill(flight) is p1  # pinned although busier
    router._cmd_end_session("s")
    assert router._choose_prefill(flight) is p0
    router.sessions["s"] = ("P1", "P1")
    router._on_death("P1")  # a dead instance drops its sessions
    assert router._choose_prefill(flight) is p0 and "s" not in router.sessions

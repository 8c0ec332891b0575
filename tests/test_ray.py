"""Multi-node deployments on a real Ray cluster on this machine (`ray.cluster_utils.Cluster`, 127.0.0.1).

Each Ray node has its own node id, so instances on different nodes talk over TCP even though they share a
host. Greedy outputs equal the single-process `runtime.Engine`'s; links within a node use shm, links across
nodes zmq frames over TCP; a removed node's instance comes back on a new node; nothing is left behind.
"""
from __future__ import annotations

import os
import subprocess
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's node IP: 127.0.0.1, not the LAN address
ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from deployment_helpers import ENGINE_ARGS, prepare, run_all, tokens  # noqa: E402
from epdlang.sampling import SamplingParams  # noqa: E402
from images import make_image  # noqa: E402
from runtime.cluster.deployment import Deployment, DeploymentError  # noqa: E402
from runtime.cluster.transfer import list_segments  # noqa: E402
from runtime.engine.core import Engine  # noqa: E402

pytestmark = pytest.mark.timeout(240)
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
NODE = {"num_cpus": 2, "object_store_memory": 80 << 20, "node_ip_address": "127.0.0.1"}
FAST_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def ray_daemons() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}


@pytest.fixture(scope="module")
def cluster():
    """Head `h` (the driver, so the router, runs on it) and two worker nodes `a`, `b`: three node ids."""
    before = ray_daemons()
    c = Cluster(initialize_head=True, head_node_args={**NODE, "resources": {"h": 4}, "include_dashboard": False,
                                                      "_system_config": FAST_DEATH})
    nodes = {"a": c.add_node(**NODE, resources={"a": 4}), "b": c.add_node(**NODE, resources={"b": 4})}
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        deadline = time.monotonic() + 20
        while ray_daemons() - before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ray_daemons() - before, "Ray processes left behind"


def topology(tmp_path, *items: tuple[str, str]) -> str:
    """A YAML topology pinning each (roles, node) item to that node by its custom resource."""
    lines = ["instances:"] + [f"  - {{roles: {roles}, threads: 1, resources: {{{node}: 1}}}}" for roles, node in items]
    path = tmp_path / "topology.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": p} if not isinstance(p, str)
                                         else {"type": "text", "text": p} for p in parts]}]


def cases() -> dict[str, dict]:
    red, blue = make_image("red", (112, 112)), make_image("blue", (168, 112))
    return {"text": {"prompt": "The quick brown fox"},
            "one_image": {"messages": _user(red, "What is this?")},
            "two_images": {"messages": _user(red, blue, "Compare them.")}}


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[str, tuple[int, ...]]:
    engine = Engine(tiny_model_dir, **ENGINE_ARGS)
    return {name: engine.generate(dict(req), GREEDY)[0].token_ids for name, req in cases().items()}


def wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        time.sleep(0.05)


def links(dep: Deployment) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for link in dep.snapshot_now()["ray"]["links"]:
        out.setdefault((link["src"], link["dst"]), set()).add(link["transport"])
    return out


def check_same_tokens(dep: Deployment, reference) -> None:
    named = cases()
    results = run_all(dep, [prepare(dep, req, GREEDY, rid=name) for name, req in named.items()], timeout_s=90)
    for name, outs in zip(named, results):
        assert not isinstance(outs, BaseException), (name, outs)
        assert tokens(outs) == reference[name], name


def node_of(dep: Deployment, name: str) -> str:
    return dep.snapshot_now()["instances"][name]["node_id"]


def test_e_p_d_over_two_nodes(cluster, tiny_model_dir, reference, tmp_path):
    """E on node a; P and D on the head, beside the router: E's links are TCP, P->D is shm."""
    spec = topology(tmp_path, ("E", "a"), ("P", "h"), ("D", "h"))
    with Deployment(tiny_model_dir, spec, ray="auto", ready_timeout_s=120, **ENGINE_ARGS) as dep:
        prefix = dep.segment_prefix
        check_same_tokens(dep, reference)
        snap = dep.snapshot_now()
        nodes = {name: info["node_id"] for name, info in snap["instances"].items()}
        assert nodes["P0"] == nodes["D0"] == snap["ray"]["router_node_id"] != nodes["E0"]
        assert all(snap["instances"][n]["address"] == "127.0.0.1" for n in nodes)
        assert links(dep) == {("router", "E0"): {"tcp"}, ("E0", "P0"): {"tcp"}, ("P0", "D0"): {"shm"}}
    assert not list_segments(prefix)


def test_2e_p_d_over_three_nodes(cluster, tiny_model_dir, reference, tmp_path):
    """One E on each worker node, P and D on the head: three node ids, the same tokens."""
    spec = topology(tmp_path, ("E", "a"), ("E", "b"), ("P", "h"), ("D", "h"))
    with Deployment(tiny_model_dir, spec, ray="auto", ready_timeout_s=120, **ENGINE_ARGS) as dep:
        prefix = dep.segment_prefix
        assert len({node_of(dep, n) for n in ("E0", "E1", "P0")}) == 3
        check_same_tokens(dep, reference)
        seen = links(dep)
        assert seen[("P0", "D0")] == {"shm"}
        assert all(t == {"tcp"} for (src, dst), t in seen.items() if "E0" in (src, dst) or "E1" in (src, dst))
    assert not list_segments(prefix)


def test_unplaceable_deployment_fails_clearly(cluster, tiny_model_dir, tmp_path):
    """A resource no node has: the placement group never fits, and the deployment says so (all or nothing)."""
    spec = topology(tmp_path, ("E", "a"), ("P", "h"), ("D", "nowhere"))
    with pytest.raises(DeploymentError, match="cannot place"):
        Deployment(tiny_model_dir, spec, ray="auto", ready_timeout_s=60, **ENGINE_ARGS, placement_timeout_s=3)
    assert all_free(), "the deployment left resources reserved"


def all_free(timeout_s: float = 15.0) -> bool:
    """Every CPU of the cluster is free again (killed actors and removed groups release theirs in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(0.2)
    return False



def test_actor_killed_or_frozen_is_replaced(cluster, tiny_model_dir, tmp_path):
    """A D beside P and one on another node: P keeps the KV in shm and the router gives it to the D beside
    P. An actor's process SIGKILLed: Ray restarts it in place and the router takes it back. One SIGSTOPped
    (alive to the OS, silent to us): after HEARTBEAT_S it is taken for dead, killed and restarted by Ray;
    meanwhile P's handoffs go over TCP to the other D."""
    import signal

    from runtime.cluster.ray_placement import HEARTBEAT_S

    spec = topology(tmp_path, ("E", "h"), ("P", "b"), ("D", "b"), ("D", "a"))
    msg = {"messages": _user(make_image("red", (112, 112)), "What is this?")}
    with Deployment(tiny_model_dir, spec, ray="auto", ready_timeout_s=120, **ENGINE_ARGS) as dep:
        prefix = dep.segment_prefix
        first = tokens(run_all(dep, [prepare(dep, msg, GREEDY)])[0])
        assert node_of(dep, "D0") == node_of(dep, "P0") != node_of(dep, "D1")
        assert links(dep)[("P0", "D0")] == {"shm"} and ("P0", "D1") not in links(dep)
        for name, sig in (("E0", signal.SIGKILL), ("D0", signal.SIGSTOP)):
            pid, deaths = dep.pids()[name], dep.router.stats["instance_deaths"]
            os.kill(pid, sig)
            t0 = time.monotonic()
            wait_for(lambda: dep.router.stats["instance_deaths"] > deaths, 10)  # noqa: B023
            noticed = time.monotonic() - t0
            assert noticed < HEARTBEAT_S + 1
            if name == "D0":  # while it is away P has no D beside it: its KV goes to D1 over TCP
                assert tokens(run_all(dep, [prepare(dep, msg, GREEDY)])[0]) == first
                assert "D0" in dep.router.views or links(dep).get(("P0", "D1")) == {"tcp"}
            wait_for(lambda: name in dep.router.views and dep.pids().get(name) != pid, 90)  # noqa: B023
            print(f"{name} {sig.name}: death noticed after {noticed:.2f}s, back after {time.monotonic() - t0:.1f}s")
            assert tokens(run_all(dep, [prepare(dep, msg, GREEDY)])[0]) == first
    assert not list_segments(prefix)
    assert all_free()


def test_epd_serve_joins_an_existing_cluster(cluster, tmp_path):
    """`epd serve tiny --ray HOST:PORT` from its own process: instances on the cluster's nodes, the openai
    client served; SIGTERM removes our actors and placement group and leaves the cluster running."""
    import signal
    import sys

    import httpx
    from openai import OpenAI

    from runtime.cluster.server_process import free_port, wait_healthy
    from server_helpers import data_url

    c, _ = cluster
    daemons, port, log = ray_daemons(), free_port(), tmp_path / "server.log"
    spec = topology(tmp_path, ("E", "a"), ("P", "b"), ("D", "b"))
    args = [sys.executable, "-m", "runtime.cli", "serve", "tiny-random", "--instances", spec, "--ray", c.address,
            "--port", str(port), "--kv-cache-mb", "32", "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 180.0, log)
        content = [{"type": "image_url", "image_url": {"url": data_url()}}, {"type": "text", "text": "What?"}]
        reply = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60).chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0)
        assert reply.usage.completion_tokens >= 1
        info = httpx.get(f"{url}/get_server_info", timeout=30).json()["engine"]
        assert info["ray"]["address"] == c.address
        assert len({i["node_id"] for i in info["instances"].values()}) == 2
        used = {(lk["src"], lk["dst"]): lk["transport"] for lk in info["ray"]["links"]}
        assert used[("E0", "P0")] == "tcp" and used[("P0", "D0")] == "shm"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert all_free(), "the server left actors or its placement group on the cluster"
    assert ray_daemons() == daemons  # the cluster is not ours: it keeps running

LOAD = SamplingParams(max_new_tokens=24, ignore_eos=True)


def load_cases() -> dict[str, dict]:
    return {c: {"messages": _user(make_image(c, (112, 112)), "Describe it.")} for c in ("red", "green", "blue")}


def test_node_removed_under_load(cluster, tiny_model_dir, tmp_path):
    """P and D on node a, E on the head. Node a goes away under load: the router hears of it within 5 s,
    requests that streamed nothing are retried, the others fail clearly at once; a new node with a's
    resources takes the bundles, Ray restarts both actors there, and later requests are answered."""
    import asyncio
    import threading

    from deployment_helpers import collect

    c, nodes = cluster
    engine = Engine(tiny_model_dir, **ENGINE_ARGS)
    expected = {name: engine.generate(dict(req), LOAD)[0].token_ids for name, req in load_cases().items()}
    del engine
    spec = topology(tmp_path, ("E", "h"), ("P", "a"), ("D", "a"))
    with Deployment(tiny_model_dir, spec, ray="auto", ready_timeout_s=120, **ENGINE_ARGS) as dep:
        prefix, old_node = dep.segment_prefix, node_of(dep, "P0")
        results: list[tuple[str, object, float]] = []
        stop = threading.Event()

        async def worker(i: int) -> None:
            names = list(expected)
            while not stop.is_set():
                name = names[(i + len(results)) % len(names)]
                out = await collect(dep, prepare(dep, load_cases()[name], LOAD))
                results.append((name, out, time.monotonic()))

        async def load() -> None:
            await asyncio.wait_for(asyncio.gather(*(worker(i) for i in range(3))), 200)

        def answered_after(t: float) -> int:
            return len([r for r in results if r[2] > t])

        loader = threading.Thread(target=asyncio.run, args=(load(),), daemon=True)
        loader.start()
        try:  # Ray adds nodes from the main thread only (it installs signal handlers)
            wait_for(lambda: len(results) >= 3, 60)
            removed_at = time.monotonic()
            c.remove_node(nodes["a"])
            wait_for(lambda: dep.router.stats["instance_deaths"] >= 2, 10)
            noticed_at = time.monotonic()
            nodes["a"] = c.add_node(**NODE, resources={"a": 4})
            wait_for(lambda: {"P0", "D0"} <= set(dep.router.views), 120)
            back_at = time.monotonic()
            wait_for(lambda: answered_after(back_at) >= 3, 60)
        finally:
            stop.set()
            loader.join(60)
        assert noticed_at - removed_at < 5, f"the router heard of the dead node after {noticed_at - removed_at:.1f}s"
        assert {"P0", "D0"} <= set(dep.router.views), "the instances did not come back"
        assert node_of(dep, "P0") != old_node
        failed = 0
        for name, out, ended in results:
            assert not isinstance(out, BaseException), out
            if out[-1].finish_reason == "error":
                failed += 1
                assert "failed while serving" in out[-1].error and ended - removed_at < 5, out[-1]
            else:
                assert tokens(out) == expected[name], name
        print(f"node removed: death noticed after {noticed_at - removed_at:.2f}s, back after "
              f"{back_at - removed_at:.1f}s; {len(results)} answered, {failed} failed, "
              f"{dep.router.stats['retried']} retried")
        assert len([r for r in results if r[2] > back_at]) >= 3 and len(results) - failed >= 6
        assert dep.router.stats["retried"] + failed >= 1  # something was in flight on node a
    assert not list_segments(prefix)
    assert all_free()


def test_topology_entries_become_bundles(tmp_path):
    """What each instance asks Ray for: CPUs (default: its threads), GPUs, custom resources such as a node."""
    from runtime.cluster.ray_placement import bundle
    from runtime.cluster.topology import parse_topology

    path = tmp_path / "t.yaml"
    path.write_text("instances:\n  - {roles: E, count: 2, threads: 2, resources: {'node:10.0.0.2': 0.01}}\n"
                    "  - {roles: P, threads: 4, num_gpus: 1}\n  - {roles: D, num_cpus: 0.5, threads: 1}\n")
    bundles = {spec.name: bundle(spec) for spec in parse_topology(str(path)).instances}
    assert bundles == {"E0": {"CPU": 2.0, "node:10.0.0.2": 0.01}, "E1": {"CPU": 2.0, "node:10.0.0.2": 0.01},
                       "P0": {"CPU": 4.0, "GPU": 1.0}, "D0": {"CPU": 0.5}}
    path.write_text("instances:\n  - {roles: EPD, resources: {gpu_box: -1}}\n")
    with pytest.raises(ValueError, match="gpu_box must be a number >= 0"):
        parse_topology(str(path))
    path.write_text("instances:\n  - {roles: EPD, resources: [a]}\n")
    with pytest.raises(ValueError, match="resources must be a mapping"):
        parse_topology(str(path))

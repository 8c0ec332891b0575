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

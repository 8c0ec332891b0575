"""Topology specs for `epd serve --instances`: strings, YAML files and every rejection."""
from __future__ import annotations

import os

import pytest

from runtime.cluster.topology import InstanceSpec, Topology, parse_topology

ACCEPTED = {
    "EPD": ["EPD0"],
    "E,PD": ["E0", "PD0"],
    "EP,D": ["EP0", "D0"],
    "ED,P": ["ED0", "P0"],
    "E,P,D": ["E0", "P0", "D0"],
    "2E,P,D": ["E0", "E1", "P0", "D0"],
    "pd,2e": ["E0", "E1", "PD0"],
    " dpe ": ["EPD0"],
    "E,PD,E": ["E0", "E1", "PD0"],
    "3PD,E,2D,P": ["E0", "P0", "PD0", "PD1", "PD2", "D0", "D1"],
}


@pytest.mark.parametrize("spec", ACCEPTED)
def test_accepted_specs(spec):
    topo = parse_topology(spec, total_threads=16)
    assert [i.name for i in topo.instances] == ACCEPTED[spec]
    for inst in topo.instances:
        assert inst.role_str == inst.name.rstrip("0123456789")
        assert inst.roles == frozenset(inst.role_str)
        assert inst.threads == max(1, 16 // len(ACCEPTED[spec]))
        assert inst.cores is None and inst.gpu is None
    for role in "EPD":
        assert topo.with_role(role) and all(i.has(role) for i in topo.with_role(role))
    assert parse_topology(topo.spec, total_threads=16) == topo


def test_canonical_spec_and_roles():
    topo = parse_topology("pd,2e", total_threads=4)
    assert topo.spec == "2E,PD"
    assert [i.name for i in topo.with_role("E")] == ["E0", "E1"]
    assert [i.name for i in topo.with_role("D")] == ["PD0"]
    assert parse_topology("E,P,D").spec == "E,P,D"
    assert parse_topology("de,p").spec == "ED,P"
    with pytest.raises(ValueError, match="unknown role"):
        topo.with_role("X")


def test_default_threads():
    assert [i.threads for i in parse_topology("2E,P,D", total_threads=10).instances] == [2, 2, 2, 2]
    assert [i.threads for i in parse_topology("2E,P,D", total_threads=3).instances] == [1, 1, 1, 1]
    expected = max(1, (os.cpu_count() or 1) // 2)
    assert [i.threads for i in parse_topology("E,PD").instances] == [expected, expected]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty item"),
        ("E,,PD", "empty item"),
        ("E,PD,", "empty item"),
        ("E,PX", "unknown role letter.*X"),
        ("EE,PD", "once per item"),
        ("E,PDP", "once per item"),
        ("0E,PD", ">= 1"),
        ("-1E,PD", ">= 1"),
        ("E,P", "role D"),
        ("PD", "role E"),
        ("2E", "role P, D"),
        ("E2,PD", "bad topology item"),
        ("E;PD", "bad topology item"),
        ("15E,PD,D", "at most 16"),
        ("missing.yaml", "does not exist"),
    ],
)
def test_rejected_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(spec)


def test_sixteen_instances_is_the_limit():
    assert len(parse_topology("14E,P,D").instances) == 16


def test_yaml_file(tmp_path):
    path = tmp_path / "topo.yaml"
    path.write_text(
        "instances:\n"
        "  - roles: E\n    count: 2\n    threads: 1\n    cores: [0]\n"
        "  - roles: dp\n    threads: 3\n    cores: [1, 2, 3]\n    gpu: 0\n"
    )
    topo = parse_topology(str(path))
    assert topo.spec == "2E,PD"
    assert topo.instances == (
        InstanceSpec("E0", frozenset("E"), threads=1, cores=(0,)),
        InstanceSpec("E1", frozenset("E"), threads=1, cores=(0,)),
        InstanceSpec("PD0", frozenset("PD"), threads=3, cores=(1, 2, 3), gpu=0),
    )


def test_yaml_default_threads(tmp_path):
    path = tmp_path / "topo.yml"
    path.write_text("instances:\n  - roles: E\n  - roles: [P, D]\n    threads: 2\n")
    topo = parse_topology(str(path), total_threads=8)
    assert [(i.name, i.threads) for i in topo.instances] == [("E0", 4), ("PD0", 2)]


@pytest.mark.parametrize(
    "body, message",
    [
        ("instances:\n  - roles: E\n    treads: 1\n  - roles: PD\n", "unknown key.*treads"),
        ("instances:\n  - roles: EPD\nworkers: 2\n", "unknown key.*workers"),
        ("instances:\n  - count: 2\n", "'roles'"),
        ("instances:\n  - roles: EPD\n    count: 0\n", ">= 1"),
        ("instances:\n  - roles: EPD\n    threads: 0\n", "threads"),
        ("instances:\n  - roles: EPD\n    cores: 3\n", "cores"),
        ("instances:\n  - roles: EPD\n    cores: [-1]\n", "cores"),
        ("instances:\n  - roles: EPD\n    gpu: x\n", "gpu"),
        ("instances:\n  - roles: E\n", "role P, D"),
        ("instances: []\n", "1 to 16"),
        ("", "'instances' list"),
        ("- roles: EPD\n", "'instances' list"),
    ],
)
def test_yaml_errors(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        parse_topology(str(path))


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="roles"):
        InstanceSpec("X0", frozenset("X"))
    with pytest.raises(ValueError, match="roles"):
        InstanceSpec("none", frozenset())
    epd = InstanceSpec("EPD0", frozenset("EPD"))
    with pytest.raises(ValueError, match="unique"):
        Topology((epd, epd))
    with pytest.raises(ValueError, match="1 to 16"):
        Topology(())

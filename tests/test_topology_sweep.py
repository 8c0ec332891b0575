"""Unit tests of the topology sweep's workloads and report (no server is started)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving.role_workloads import WORKLOADS, build_role_workload  # noqa: E402
from benchmarks.serving.topology_report import best_vs_colocated, plot, table  # noqa: E402
from benchmarks.topology_sweep import parse_args  # noqa: E402


def image_urls(reqs) -> list[str]:
    return [part["image_url"]["url"] for r in reqs for m in r.messages for part in m["content"]
            if part.get("type") == "image_url"]


def test_role_workload_shapes() -> None:
    enc = build_role_workload("encode-heavy", 3)
    dec = build_role_workload("decode-heavy", 3)
    assert {(r.num_images, r.output_len) for r in enc} == {(4, 8)}
    assert {(r.num_images, r.output_len) for r in dec} == {(1, 128)}
    mixed = build_role_workload("mixed", 8)
    assert sorted(r.output_len for r in mixed) == [8] * 4 + [128] * 4
    with pytest.raises(ValueError):
        build_role_workload("nope", 1)


def test_images_distinct_and_seeded() -> None:
    urls = [u for w in WORKLOADS for u in image_urls(build_role_workload(w, 4))]
    warm = [u for w in WORKLOADS for u in image_urls(build_role_workload(w, 2, seed=7919))]
    assert len(set(urls + warm)) == len(urls) + len(warm)
    assert image_urls(build_role_workload("mixed", 4)) == image_urls(build_role_workload("mixed", 4))


def cell(topology: str, workload: str, rps: float, status: str = "ok") -> dict:
    return {"topology": topology, "workload": workload, "status": status, "errors": [], "failed": 0,
            "request_throughput": rps, "output_throughput": 8 * rps,
            "ttft_ms": {"p50": 100.0, "p90": 200.0}, "tpot_ms": {"p50": 10.0, "p90": 20.0}}


def test_best_vs_colocated_ignores_failed_cells(tmp_path: Path) -> None:
    cells = [cell("EPD", "mixed", 2.0), cell("E,PD", "mixed", 3.0), cell("E,P,D", "mixed", 9.0, "errors"),
             cell("EPD", "decode-heavy", 2.0), {"topology": "E,PD", "workload": "decode-heavy",
                                                "status": "timeout", "errors": ["late\n"]}]
    ratios = best_vs_colocated(cells)
    assert ratios["mixed"]["best"] == "E,PD" and ratios["mixed"]["ratio"] == pytest.approx(1.5)
    assert ratios["decode-heavy"]["ratio"] is None
    text = table(cells)
    assert "timeout: late" in text and "E,P,D" in text
    assert plot(cells, tmp_path / "p.png").stat().st_size > 0


def test_quick_loads_and_overrides() -> None:
    args = parse_args(["--quick", "--workloads", "mixed", "--num-prompts", "5", "--topologies", "EPD;E,P,D"])
    assert args.topologies == ["EPD", "E,P,D"]
    assert args.loads["mixed"].num_prompts == 5 and args.warmups == 1

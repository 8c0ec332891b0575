"""`benchmarks/planner_gpu_table.py` drives `epd plan --gpus N` through its own parser: a small run end to end."""
from __future__ import annotations

import json

from benchmarks.planner_gpu_table import main
from runtime.planner.search import gpu_nodes


def test_a_small_gpu_table_plans_every_size_and_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "table.json"
    assert main(["--per-gpu", "10", "--gpus", "8", "--workloads", "encode-heavy", "--simulate-top", "2",
                 "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["workload"] == "encode-heavy" and row["gpus"] == 8
    assert len(gpu_nodes(row["recommended"])) == 8 and len(gpu_nodes(row["runner_up"])) == 8
    assert row["runner_up"] != row["recommended"]
    assert row["colocated_goodput_rps"] > 0
    assert row["goodput_rps"] is None or row["goodput_rps"] >= row["runner_up_goodput_rps"]
    assert f"| encode-heavy | 8 | `{row['recommended']}` |" in capsys.readouterr().out

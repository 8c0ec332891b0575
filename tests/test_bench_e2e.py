"""`epd bench` end to end: self-launches a real `epd serve tiny`, runs a small sweep, checks the files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_epd(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_bench_self_launch_sweep_writes_json_and_plots(tmp_path: Path) -> None:
    out = run_epd("bench", "--launch", "EPD", "--launch-args", "--num-threads 1 --kv-cache-mb 64 --log-level warning",
                  "--dataset", "fixed", "--num-prompts", "6", "--output-len", "8", "--ignore-eos",
                  "--max-concurrency", "4", "--sweep-rates", "4,16", "--slo-ttft-ms", "60000",
                  "--slo-tpot-ms", "10000", "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "SLO attainment" in out.stdout and "goodput" in out.stdout
    runs = sorted(tmp_path.glob("EPD-fixed-r*.json"))
    assert len(runs) == 2
    doc = json.loads(runs[0].read_text())
    assert doc["kind"] == "run" and doc["config"]["num_prompts"] == 6 and doc["config"]["slo_ttft_ms"] == 60000
    assert doc["completed"] == 6 and doc["failed"] == 0
    assert all(r["output_tokens"] == 8 for r in doc["requests"])  # ignore_eos: exact lengths
    assert doc["ttft_ms"]["p90"] > 0 and doc["tpot_ms"]["p50"] > 0 and doc["slo_attainment"] == 1.0
    sweep = json.loads(next(tmp_path.glob("EPD-fixed-sweep-*.json")).read_text())
    assert sweep["goodput"] == 16 and [p["rate"] for p in sweep["points"]] == [4, 16]
    pngs = list(tmp_path.glob("*.png"))
    assert {p.name.rsplit("-", 1)[-1] for p in pngs} == {"cdf.png", "attainment.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    cmp = run_epd("bench", "compare", *map(str, runs), timeout=60)
    assert cmp.returncode == 0 and "ratios vs first" in cmp.stdout and "1.00x" in cmp.stdout

"""The reliability benchmarks, bounded, on real `epd serve` processes: a 60-second fault run (SIGKILL of E,
then P, then D under load) and an overload run (far more requests and context than the KV pool holds)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.reliability.faults import FAIL_PROMPT_S

ROOT = Path(__file__).resolve().parents[1]


def reliability(mode: str, tmp_path: Path, *args: str, timeout: float = 400) -> dict:
    out = tmp_path / f"{mode}.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.reliability", mode, "--json", str(out),
                           "--log-dir", str(tmp_path), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(420)
def test_faults_60s_run_hangs_nothing_and_recovers(tmp_path):
    report = reliability("faults", tmp_path, "--seconds", "60", "--rate", "2", "--output-len", "24")
    assert report["hung"] == 0 and report["requests"] == 120
    assert [k["instance"] for k in report["kills"]] == ["E0", "P0", "D0"]
    for kill in report["kills"]:
        assert kill["back_after_s"] is not None and kill["fail_after_kill_s_max"] <= FAIL_PROMPT_S, kill
    assert report["ok_requests"] >= report["requests"] - sum(k["failed"] for k in report["kills"])
    assert report["integrity_ok"] and report["segments_left"] == [] and report["healthy_after"]
    assert report["ok"]


@pytest.mark.timeout(420)
def test_overload_completes_identically_or_refuses_clearly(tmp_path):
    report = reliability("overload", tmp_path, "--requests", "32", "--distinct", "8", "--text-words", "300")
    assert report["crashes"] == report["server_errors"] == report["bad_error_bodies"] == 0
    assert report["completed"] > 0 and report["identical"] == report["completed"]  # same as unloaded
    assert report["refused_503"] > 0 and report["with_retry_after"] == report["refused_503"]  # waiting queue
    assert report["refused_4xx"] > 0  # the prompts that can never fit the pool
    assert report["completed"] + report["refused_503"] + report["refused_4xx"] == report["requests"]
    assert report["integrity_ok"] and report["segments_left"] == [] and report["healthy_after"]
    assert report["ok"]

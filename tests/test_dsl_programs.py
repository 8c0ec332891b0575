"""Every example in programs/ runs against the embedded tiny model (one bounded subprocess each)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = sorted(p for p in (Path(__file__).resolve().parents[1] / "programs").glob("*.py")
                  if not p.name.startswith("_"))


def test_programs_present():
    assert {p.stem for p in PROGRAMS} >= {"image_qa", "multi_image_compare", "few_shot", "fork_descriptions",
                                          "json_extract", "agent_loop"}


@pytest.mark.parametrize("program", PROGRAMS, ids=lambda p: p.stem)
def test_program_runs(program: Path, tiny_model_dir):
    out = subprocess.run([sys.executable, str(program), "--model", str(tiny_model_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # each prints a dict last
    assert isinstance(result, dict) and result

"""The package layout holds: imports point one way (server -> cluster -> engine -> models, all above the
shared leaf modules), `runtime/` keeps few top-level modules, and no source file outgrows 400 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime"
# Higher may import lower or equal, never the reverse. Leaves are shared types and helpers; preprocess
# reads the model's config object, so it sits just above models (and below everything that uses it); the
# shapes model's trainer uses preprocess, so it shares that rank. The planner models the cluster and the
# engine; the server asks it for role-switching moves.
RANK = {"runtime.config": 0, "runtime.messages": 0, "runtime.tiny_model": 0, "runtime.models": 1,
        "runtime.preprocess": 1.5, "runtime.shapes": 1.5, "runtime.engine": 2,
        "runtime.cluster": 3, "runtime.planner": 3.5, "runtime.server": 4, "runtime.cli": 5, "runtime.quickstart": 5,
        "runtime": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    """The rank of the part a module belongs to (its longest prefix in RANK)."""
    while module not in RANK:
        module = module.rpartition(".")[0]
    return RANK[module]


def runtime_imports(path: Path) -> set[str]:
    """Every `runtime...` module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "runtime" or m.startswith("runtime.")}


SOURCES = sorted(RUNTIME.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    here = module_name(path)
    wrong = sorted(m for m in runtime_imports(path) if rank(m) > rank(here))
    assert not wrong, f"{here} (rank {rank(here)}) imports higher parts: {wrong}"


def test_the_direction_check_catches_a_wrong_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from runtime.server.metrics import Metrics\n")
    assert runtime_imports(probe) == {"runtime.server.metrics", "runtime.server.metrics.Metrics"}
    assert rank("runtime.server.metrics.Metrics") > rank("runtime.engine.core") > rank("runtime.models.layers")
    assert rank("runtime.engine") > rank("runtime.preprocess") > rank("runtime.messages") == rank("runtime.config")


def test_runtime_has_few_top_level_modules():
    top = sorted(p.name for p in RUNTIME.glob("*.py"))
    assert len(top) <= 8, top


@pytest.mark.parametrize("folder", ["runtime", "epdlang", "benchmarks", "programs"])
def test_no_source_file_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long

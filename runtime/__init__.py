"""The serving runtime. `runtime.Engine` is the offline, in-process engine (`Engine(model).generate(...)`);
`epd serve` (runtime.cli) runs a topology of instance processes behind an HTTP server.

Names are resolved on first use, so that `import runtime` (as the `epd` command does) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Engine": "runtime.engine.core", "Completion": "runtime.engine.completion", "EngineConfig": "runtime.config",
         "Deployment": "runtime.cluster.deployment", "ensure_tiny_model": "runtime.tiny_model"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")

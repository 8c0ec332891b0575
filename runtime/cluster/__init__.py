"""The cluster: the processes of one deployment and what moves between them.

- `Deployment` (deployment): starts a topology, owns the router thread, the async surface for the server.
- `parse_topology`/`Topology` (topology): `EPD`, `E,P,D`, `2E,P,D`, YAML specs.
- `Launcher` (launcher): starts, watches and restarts instance processes.
- instance: `python -m runtime.cluster.instance`, one process around one `RoleEngine` (role_engine).
- `Router` (router, router_inbox, router_policy): picks E, P and D per request, by cache hit then load.
- wire: typed control messages (msgspec); transfer: the data plane (shm, zmq frames).

It imports `runtime.engine` and the shared leaf modules, never `runtime.server`. Names load on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_OFFERS = {"Deployment": "deployment", "DeploymentError": "deployment", "Topology": "topology",
           "parse_topology": "topology", "Launcher": "launcher", "Router": "router",
           "RoleEngine": "role_engine", "make_transfer": "transfer"}
__all__ = sorted(_OFFERS)


def __getattr__(name: str) -> Any:
    if name in _OFFERS:
        return getattr(importlib.import_module(f"{__name__}.{_OFFERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

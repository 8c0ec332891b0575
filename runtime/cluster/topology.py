"""Deployment topologies for `epd serve MODEL --instances SPEC`: which instances run which of the E, P, D roles.

SPEC is either a string such as "EPD", "E,PD", "2E,P,D" (items `[N]ROLES`, letters in any order or case)
or a .yaml/.yml file listing instances with their threads, CPU cores and GPU.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import yaml

ROLES = "EPD"
MAX_INSTANCES = 16
_ITEM = re.compile(r"([+-]?\d+)?([A-Za-z]+)")
_YAML_ITEM_KEYS = {"roles", "count", "threads", "cores", "gpu", "num_cpus", "num_gpus", "resources"}


@dataclass(frozen=True)
class InstanceSpec:
    name: str  # roles + index among the instances with the same roles: "E0", "PD0", "EPD0"
    roles: frozenset[str]  # non-empty subset of ROLES
    threads: int | None = None  # torch CPU threads
    cores: tuple[int, ...] | None = None  # CPU affinity (os.sched_setaffinity)
    gpu: int | None = None
    # Placement on Ray (`--ray`): what the instance asks the cluster for; CPUs default to `threads`.
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: tuple[tuple[str, float], ...] = ()  # e.g. (("node:10.0.0.2", 0.01),) pins it to that node

    def __post_init__(self) -> None:
        if not self.roles or not self.roles <= set(ROLES):
            raise ValueError(f"instance {self.name}: roles must be a non-empty subset of {ROLES}, got {self.roles}")
        if self.threads is not None and not _is_int(self.threads, 1):
            raise ValueError(f"instance {self.name}: threads must be an integer >= 1, got {self.threads!r}")
        if self.cores is not None and (not self.cores or not all(_is_int(c, 0) for c in self.cores)):
            raise ValueError(f"instance {self.name}: cores must be a non-empty list of core ids, got {self.cores!r}")
        if self.gpu is not None and not _is_int(self.gpu, 0):
            raise ValueError(f"instance {self.name}: gpu must be an integer >= 0, got {self.gpu!r}")
        for key, amount in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), *self.resources):
            if amount is not None and not (isinstance(amount, (int, float)) and not isinstance(amount, bool)
                                           and amount >= 0):
                raise ValueError(f"instance {self.name}: {key} must be a number >= 0, got {amount!r}")

    @property
    def role_str(self) -> str:
        return _role_str(self.roles)

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Topology:
    instances: tuple[InstanceSpec, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.instances) <= MAX_INSTANCES:
            raise ValueError(f"a topology needs 1 to {MAX_INSTANCES} instances, got {len(self.instances)}")
        missing = [r for r in ROLES if not any(i.has(r) for i in self.instances)]
        if missing:
            raise ValueError(f"no instance runs role {', '.join(missing)}: every request needs E, P and D")
        names = [i.name for i in self.instances]
        if len(set(names)) != len(names):
            raise ValueError(f"instance names must be unique, got {names}")

    def with_role(self, role: str) -> tuple[InstanceSpec, ...]:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        return tuple(i for i in self.instances if i.has(role))

    @property
    def spec(self) -> str:
        """Canonical string form of the roles (threads, cores and GPUs are not part of it)."""
        runs = [(roles, len(list(group))) for roles, group in groupby(i.role_str for i in self.instances)]
        return ",".join(f"{n}{roles}" if n > 1 else roles for roles, n in runs)


def parse_topology(spec: str, total_threads: int | None = None) -> Topology:
    """A string spec or a .yaml/.yml file; threads default to an even share of `total_threads` (or all CPUs)."""
    if spec.strip().lower().endswith((".yaml", ".yml")):
        items = _load_yaml(spec.strip())
    else:
        items = [_parse_item(item) for item in spec.split(",")]
    count = sum(item["count"] for item in items)
    if count > MAX_INSTANCES:
        raise ValueError(f"topology {spec!r} has {count} instances; at most {MAX_INSTANCES} are supported")
    default_threads = max(1, (total_threads or os.cpu_count() or 1) // max(1, count))
    return Topology(tuple(_instances(items, default_threads)))


def _parse_item(item: str) -> dict[str, Any]:
    text = item.strip()
    if not text:
        raise ValueError("empty item in topology spec (stray comma?)")
    match = _ITEM.fullmatch(text)
    if match is None:
        raise ValueError(f"bad topology item {text!r}: expected [N]ROLES such as '2E' or 'PD'")
    count = int(match[1]) if match[1] else 1
    return {"roles": _roles(match[2], text), "count": _count(count, text)}


def _roles(letters: str, where: str) -> frozenset[str]:
    upper = letters.upper()
    unknown = sorted(set(upper) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role letter(s) {', '.join(unknown)} in {where!r} (roles: {', '.join(ROLES)})")
    if not upper:
        raise ValueError(f"no roles given in {where!r}")
    if len(set(upper)) != len(upper):
        raise ValueError(f"each role may appear once per item, got {letters!r} in {where!r}")
    return frozenset(upper)


def _count(count: Any, where: str) -> int:
    if not _is_int(count, 1):
        raise ValueError(f"instance count must be an integer >= 1, got {count!r} in {where!r}")
    return count


def _load_yaml(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ValueError(f"topology file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise ValueError(f"{path}: expected a mapping with an 'instances' list")
    _no_unknown_keys(doc, {"instances"}, path)
    return [_yaml_item(raw, f"{path}: instances[{i}]") for i, raw in enumerate(doc["instances"])]


def _yaml_item(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or "roles" not in raw:
        raise ValueError(f"{where}: expected a mapping with 'roles'")
    _no_unknown_keys(raw, _YAML_ITEM_KEYS, where)
    letters = raw["roles"] if isinstance(raw["roles"], str) else "".join(map(str, raw["roles"] or []))
    cores = raw.get("cores")
    if cores is not None and not isinstance(cores, list):
        raise ValueError(f"{where}: cores must be a list of core ids, got {cores!r}")
    return {
        "roles": _roles(letters, where),
        "count": _count(raw.get("count", 1), where),
        "threads": raw.get("threads"),
        "cores": None if cores is None else tuple(cores),
        "gpu": raw.get("gpu"),
        "num_cpus": raw.get("num_cpus"),
        "num_gpus": raw.get("num_gpus"),
        "resources": _resources(raw.get("resources"), where),
    }


def _resources(raw: Any, where: str) -> tuple[tuple[str, float], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: resources must be a mapping of resource name to amount, got {raw!r}")
    return tuple(sorted((str(k), v) for k, v in raw.items()))


def _no_unknown_keys(mapping: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(map(str, set(mapping) - allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _instances(items: list[dict[str, Any]], default_threads: int) -> Iterable[InstanceSpec]:
    """Instances in canonical order (by roles, pipeline order E before P before D), named per role set."""
    ordered = sorted(items, key=lambda item: [ROLES.index(r) for r in _role_str(item["roles"])])
    seen: dict[frozenset[str], int] = {}
    for item in ordered:
        for _ in range(item["count"]):
            index = seen.get(item["roles"], 0)
            seen[item["roles"]] = index + 1
            threads = item.get("threads")
            yield InstanceSpec(
                name=f"{_role_str(item['roles'])}{index}",
                roles=item["roles"],
                threads=default_threads if threads is None else threads,
                cores=item.get("cores"),
                gpu=item.get("gpu"),
                num_cpus=item.get("num_cpus"),
                num_gpus=item.get("num_gpus"),
                resources=item.get("resources", ()),
            )


def _role_str(roles: Iterable[str]) -> str:
    return "".join(r for r in ROLES if r in roles)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

"""The stage compiler: trace a program into a stage plan of Encode, Prefill, Decode and Score nodes.

Tracing runs the function once with a `TraceState` (no backend is called). Reading a generated
variable gives a `Placeholder`: it may be concatenated into later text (`"x" + s["a"]`), but anything
that needs its value (`if`, `==`, `str()`, f-strings, `json.loads`, indexing) raises `TraceStop`, and
the plan ends there with an "eager from here" marker naming the statement. Nodes:

- Encode: one per distinct image the trace saw; all at the start, with no dependencies (encode-ahead).
- Prefill: the new prompt segment before a gen (later turns reuse the earlier KV: sessions), or the
  shared prefix of a fork, prefilled once for all branches.
- Decode: one per gen.
- Score: one per select: prefill-only scoring of every choice; it never takes a decode slot.
"""
from __future__ import annotations

import linecache
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from epdlang.ir import Expr, Gen, Image, ProgramError, RoleBegin, Select, Text, VarRef, as_expr


class TraceStop(Exception):
    """The program needs a value that only exists at run time."""


class Placeholder:
    """A generated value during tracing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __epd_expr__(self) -> Expr:
        return VarRef(self.name)

    def __add__(self, other: Any) -> Expr:
        return VarRef(self.name) + other

    def __radd__(self, other: Any) -> Expr:
        return as_expr(other) + VarRef(self.name)

    def _stop(self, *args: Any) -> Any:
        raise TraceStop(f"uses the value of {self.name!r}")

    __str__ = __bool__ = __eq__ = __ne__ = __lt__ = __gt__ = __len__ = __iter__ = __contains__ = _stop
    __getitem__ = __int__ = __float__ = __format__ = __hash__ = _stop


@dataclass(frozen=True)
class Node:
    id: str
    kind: str  # Encode | Prefill | Decode | Score
    label: str
    deps: tuple[str, ...] = ()
    branch: str = "main"


@dataclass
class Plan:
    """A program's stage plan. `images` feed encode-ahead; `first_prefix` is the prompt before the
    first gen/select of the main branch (run_batch shares it); `stopped` says where eager takes over."""

    name: str
    nodes: list[Node] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    first_prefix: list[Expr] | None = None
    stopped: str | None = None

    def kinds(self) -> list[str]:
        return [n.kind for n in self.nodes]

    def explain(self) -> str:
        lines = [f"stage plan for {self.name}: {len(self.nodes)} nodes, {len(self.images)} images"]
        for n in self.nodes:
            deps = f"  <- {', '.join(n.deps)}" if n.deps else ""
            lines.append(f"  {n.id:>4} {n.kind:<8}[{n.branch}] {n.label}{deps}")
        lines.append(f"  eager from {self.stopped}" if self.stopped else "  (fully traced)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


class _Builder:
    def __init__(self, plan: Plan) -> None:
        self.plan, self.encodes, self.others = plan, {}, []

    def encode(self, img: Image) -> str:
        if img.key not in self.encodes:
            node = Node(f"e{len(self.encodes) + 1}", "Encode", f"image {len(self.encodes) + 1} ({img.key[:40]})")
            self.encodes[img.key] = node
            self.plan.images.append(img)
        return self.encodes[img.key].id

    def add(self, kind: str, label: str, deps: tuple[str, ...], branch: str) -> str:
        node = Node(f"n{len(self.others) + 1}", kind, label, tuple(dict.fromkeys(deps)), branch)
        self.others.append(node)
        return node.id

    def finish(self) -> Plan:
        self.plan.nodes = list(self.encodes.values()) + self.others
        return self.plan


class TraceState:
    """Stands in for `ProgramState` while tracing; records stages instead of running them."""

    def __init__(self, builder: _Builder, branch: str = "main", pieces: list | None = None,
                 deps: tuple[str, ...] = ()) -> None:
        self.builder, self.branch = builder, branch
        self.pieces: list[Expr] = list(pieces or [])
        self.deps, self.new_images, self.calls = deps, [], 0

    def __iadd__(self, other: Any) -> "TraceState":
        for piece in as_expr(other).pieces():
            self._record(piece)
        return self

    def _record(self, piece: Expr) -> None:
        if isinstance(piece, Image):
            self.new_images.append(self.builder.encode(piece))
        if isinstance(piece, (Gen, Select)):
            self._call(piece)
            piece = VarRef(piece.name)
        self.pieces.append(piece)

    def _call(self, piece: Gen | Select) -> None:
        if self.branch == "main" and self.builder.plan.first_prefix is None:
            self.builder.plan.first_prefix = list(self.pieces)
        deps = self.deps + tuple(self.new_images)
        segment = _describe(self.pieces[self._since():])
        reuse = " (reuses this program's KV)" if self.calls else ""
        if isinstance(piece, Select):
            label = f'select "{piece.name}": {len(piece.choices)} choices by prompt logprob, prefill-only'
            self.deps = (self.builder.add("Score", f"{label}; new prompt: {segment}{reuse}", deps, self.branch),)
        else:
            pre = self.builder.add("Prefill", f"{segment}{reuse}", deps, self.branch)
            args = ", ".join(f"{k}={v!r}"[:60] for k, v in piece.sampling.items())
            self.deps = (self.builder.add("Decode", f'gen "{piece.name}"({args})', (pre,), self.branch),)
        self.new_images, self.calls, self._mark = [], self.calls + 1, len(self.pieces) + 1

    def _since(self) -> int:
        return getattr(self, "_mark", 0)

    def __getitem__(self, name: str) -> Placeholder:
        return Placeholder(name)

    def fork(self, size: int = 1) -> list["TraceState"]:
        deps = self.deps + tuple(self.new_images)
        if size > 1:
            label = f"shared prefix of {size} branches, prefilled once ({_describe(self.pieces)})"
            deps = (self.builder.add("Prefill", label, deps, self.branch),)
        branches = [TraceState(self.builder, f"{self.branch}/{i}", self.pieces, deps) for i in range(size)]
        for b in branches:
            b._mark, b.calls = len(self.pieces), self.calls
        return _TraceForks(self, branches)

    def text(self) -> str:
        raise TraceStop("reads the program text")

    def messages(self) -> list:
        raise TraceStop("reads the program messages")

    def get_meta_info(self, name: str) -> dict:
        raise TraceStop(f"reads the meta info of {name!r}")

    def get_var(self, name: str) -> Placeholder:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        pass

    def sync(self, timeout: float | None = None) -> "TraceState":
        return self


class _TraceForks(list):
    def __init__(self, parent: TraceState, branches: list[TraceState]) -> None:
        super().__init__(branches)
        self.parent = parent

    def join(self, mode: str = "gather_variable") -> None:
        self.parent.deps = tuple(d for b in self for d in b.deps)


def _describe(pieces: list[Expr]) -> str:
    chars = sum(len(p.text) for p in pieces if isinstance(p, Text))
    images = sum(isinstance(p, Image) for p in pieces)
    refs = [p.name for p in pieces if isinstance(p, VarRef)]
    roles = [p.role for p in pieces if isinstance(p, RoleBegin)]
    parts = [f"{chars} chars"] + ([f"{images} images"] if images else [])
    parts += [f"roles {'/'.join(roles)}"] if roles else []
    parts += [f"uses {', '.join(refs)}"] if refs else []
    return ", ".join(parts)


def trace(fn: Callable, name: str, args: tuple, kwargs: dict) -> Plan:
    """Run `fn` on a `TraceState`; stop (and record where) at the first value it cannot trace."""
    builder = _Builder(Plan(name))
    try:
        fn(TraceState(builder), *args, **kwargs)
    except ProgramError:
        raise
    except Exception as e:  # TraceStop, or any error a placeholder caused (e.g. json.loads on it)
        reason = str(e) if isinstance(e, TraceStop) else f"{type(e).__name__}: {e}"
        builder.plan.stopped = f"{_user_frame(e.__traceback__)} ({reason})"
    return builder.finish()


def _user_frame(tb) -> str:
    skip = (__file__.rsplit("/", 1)[0], sys.base_prefix, sys.prefix)
    last = None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if not name.startswith(skip) and "site-packages" not in name and not name.startswith("<"):
            last = tb
        tb = tb.tb_next
    if last is None:
        return "<unknown>"
    code = last.tb_frame.f_code
    src = linecache.getline(code.co_filename, last.tb_lineno).strip()
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{last.tb_lineno}: `{src}`"

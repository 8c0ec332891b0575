"""Program expressions: what `s += ...` accepts. Built eagerly and validated where they are written.

`epd.image(x) + "text"` and `epd.user(...)` build flat `Concat`s of the primitive pieces below.
Construction errors are `ProgramError`s that name the file, line and source of the offending statement.
"""
from __future__ import annotations

import hashlib
import json
import linecache
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from epdlang.errors import InvalidRequest
from epdlang.sampling import SamplingParams

SAMPLING_ALIASES = {"max_tokens": "max_new_tokens"}  # SGLang spellings


class ProgramError(InvalidRequest):
    """A program is malformed; the message names the offending statement."""


def where(depth: int = 2) -> str:
    """`file:line: source` of the first caller frame outside epdlang (the user's statement)."""
    frame = sys._getframe(depth)
    pkg = str(Path(__file__).parent)
    while frame is not None and frame.f_code.co_filename.startswith(pkg):
        frame = frame.f_back
    if frame is None:
        return "<unknown>"
    code = frame.f_code
    src = linecache.getline(code.co_filename, frame.f_lineno).strip()
    return f"{Path(code.co_filename).name}:{frame.f_lineno}: `{src}`"


def fail(message: str) -> ProgramError:
    return ProgramError(f"{message} (at {where(3)})")


class Expr:
    """Base of every program piece; `+` concatenates."""

    def pieces(self) -> tuple["Expr", ...]:
        return (self,)

    def __add__(self, other: Any) -> "Concat":
        return Concat(self.pieces() + as_expr(other).pieces())

    def __radd__(self, other: Any) -> "Concat":
        return Concat(as_expr(other).pieces() + self.pieces())


@dataclass(frozen=True)
class Text(Expr):
    text: str


@dataclass(frozen=True)
class VarRef(Expr):
    """The (not yet known) value of a variable; only appears while tracing."""

    name: str


@dataclass(frozen=True, eq=False)
class Image(Expr):
    """One image. `key` identifies it within a program (equal keys are the same image)."""

    source: Any
    key: str


@dataclass(frozen=True)
class Gen(Expr):
    name: str
    sampling: dict = field(default_factory=dict)  # explicit SamplingParams fields only


@dataclass(frozen=True)
class Select(Expr):
    name: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class RoleBegin(Expr):
    role: str


@dataclass(frozen=True)
class RoleEnd(Expr):
    role: str


@dataclass(frozen=True)
class Concat(Expr):
    parts: tuple[Expr, ...]

    def pieces(self) -> tuple[Expr, ...]:
        return self.parts


def as_expr(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, str):
        return Text(x)
    to_expr = getattr(x, "__epd_expr__", None)
    if to_expr is not None:
        return to_expr()
    raise fail(f"cannot add a {type(x).__name__} to a program; use a str, epd.image(...), epd.gen(...) or a role")


# ---- constructors (the public API) -------------------------------------------------------------

def gen(name: str | None = None, *, choices: Sequence[str] | None = None, **sampling: Any) -> Expr:
    """Generate into variable `name`. Sampling keywords are `SamplingParams` fields (`max_tokens` is
    accepted for `max_new_tokens`); `json_schema` may be a dict. With `choices`, this is `select`."""
    if not isinstance(name, str) or not name:
        raise fail('gen() needs a variable name, e.g. epd.gen("answer", max_tokens=64)')
    if choices is not None:
        return _select(name, choices)
    return Gen(name, _sampling_dict(sampling))


def select(name: str | None = None, choices: Sequence[str] | None = None) -> Expr:
    """Pick one of `choices` by normalised prompt logprob (a prefill-only Score job)."""
    if not isinstance(name, str) or not name:
        raise fail('select() needs a variable name, e.g. epd.select("answer", choices=["yes", "no"])')
    return _select(name, choices)


def _select(name: str, choices: Any) -> Select:
    if not choices or isinstance(choices, str) or not all(isinstance(c, str) and c for c in choices):
        raise fail(f"select {name!r} needs a non-empty list of non-empty strings as choices")
    return Select(name, tuple(choices))


def _sampling_dict(kwargs: dict) -> dict:
    values = {SAMPLING_ALIASES.get(k, k): v for k, v in kwargs.items()}
    if isinstance(values.get("json_schema"), dict):
        values["json_schema"] = json.dumps(values["json_schema"])
    unknown = set(values) - SamplingParams.field_names()
    if unknown:
        raise fail(f"gen() got unknown sampling arguments {sorted(unknown)}")
    if values.get("regex") is not None:
        try:
            re.compile(values["regex"])
        except (re.error, TypeError) as e:
            raise fail(f"gen() got an invalid regex {values['regex']!r}: {e}") from None
    if values.get("json_schema") is not None:
        try:
            json.loads(values["json_schema"])
        except (ValueError, TypeError) as e:
            raise fail(f"gen() got an invalid json_schema: {e}") from None
    try:
        SamplingParams.from_dict(values)
    except InvalidRequest as e:
        raise fail(f"gen() got invalid sampling arguments: {e}") from None
    return values


def image(x: Any) -> Image:
    """An image from a path, bytes, PIL image, data URL or http(s) URL."""
    if isinstance(x, str) and x.startswith(("http://", "https://", "data:")):
        return Image(x, "url:" + hashlib.sha256(x.encode()).hexdigest())
    if isinstance(x, (str, Path)):
        return Image(x, _path_key(Path(x)))
    if isinstance(x, (bytes, bytearray, memoryview)):
        return Image(bytes(x), "bytes:" + hashlib.sha256(bytes(x)).hexdigest())
    if type(x).__module__.startswith("PIL.") and hasattr(x, "tobytes"):
        digest = hashlib.sha256(f"{x.mode}:{x.size}:".encode() + x.tobytes()).hexdigest()
        return Image(x, f"pil:{digest}")
    if isinstance(x, VarRef) or hasattr(x, "__epd_expr__"):
        raise_untraceable("an image from a generated value")
    raise fail(f"epd.image() got an unknown image type {type(x).__name__}; "
               "use a path, bytes, a PIL image or a URL")


def _path_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"path:{path.resolve()}"  # reading it fails later, with the image error
    return f"path:{path.resolve()}:{st.st_mtime_ns}:{st.st_size}"


def raise_untraceable(reason: str) -> None:
    from epdlang.tracing import TraceStop

    raise TraceStop(reason)


def role(name: str, expr: Any = None) -> Expr:
    if expr is None:
        return Concat((RoleBegin(name), RoleEnd(name)))
    return Concat((RoleBegin(name),) + as_expr(expr).pieces() + (RoleEnd(name),))


def system(expr: Any = None) -> Expr:
    return role("system", expr)


def user(expr: Any = None) -> Expr:
    return role("user", expr)


def assistant(expr: Any = None) -> Expr:
    return role("assistant", expr)


def system_begin() -> Expr:
    return RoleBegin("system")


def system_end() -> Expr:
    return RoleEnd("system")


def user_begin() -> Expr:
    return RoleBegin("user")


def user_end() -> Expr:
    return RoleEnd("user")


def assistant_begin() -> Expr:
    return RoleBegin("assistant")


def assistant_end() -> Expr:
    return RoleEnd("assistant")

"""`@epd.function`: a program. `run` traces it (no backend calls), applies the plan's passes, then
runs the function for real; `run_batch` does the same for many argument sets at once."""
from __future__ import annotations

import functools
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from epdlang.backends.base import Backend
from epdlang.executor import run_sync
from epdlang.ir import SAMPLING_ALIASES, Expr, Image, ProgramError, Text
from epdlang.sampling import SamplingParams
from epdlang.state import ProgramState
from epdlang.tracing import Plan, trace

DEFAULT_SAMPLING = {"max_new_tokens": 128}  # SGLang's default for gen
_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    global _default_backend
    _default_backend = backend


def get_default_backend() -> Backend | None:
    return _default_backend


class SglFunction:
    """A program; call `run`, `run_batch`, `bind` or `trace`/`compile`."""

    def __init__(self, fn: Callable, bound: dict | None = None) -> None:
        self.fn, self.bound = fn, dict(bound or {})
        self.name = getattr(fn, "__name__", "program")
        self.params = list(inspect.signature(fn).parameters)[1:]
        functools.update_wrapper(self, fn)

    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise ProgramError(f"{self.name}() has no parameters {sorted(unknown)}")
        return SglFunction(self.fn, self.bound | kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Plan:
        """The stage plan for these arguments (runs no model)."""
        args_, kwargs_, _ = self._split(args, kwargs)
        return trace(self.fn, self.name, args_, kwargs_)

    compile = trace

    def run(self, *args: Any, stream: bool = False, backend: Backend | None = None, optimize: bool = True,
            **kwargs: Any) -> ProgramState:
        """Run once. Keywords that are sampling fields (and not parameters) set this run's gen defaults."""
        args_, kwargs_, defaults = self._split(args, kwargs)
        backend = self._backend(backend)
        plan = trace(self.fn, self.name, args_, kwargs_) if optimize else None
        if plan is not None:
            run_sync(backend.encode_ahead(plan.images))
        return self._start(backend, defaults, args_, kwargs_, stream)

    def run_batch(self, batch_kwargs: list[dict], *, backend: Backend | None = None, progress_bar: bool = False,
                  num_threads: int | str = "auto", optimize: bool = True, **sampling: Any) -> list[ProgramState]:
        """Run once per dict of arguments, concurrently. Images of all items are encoded ahead and the
        items' common prompt prefix is prefilled once before they start."""
        backend = self._backend(backend)
        items = [self._split((), dict(kw) | sampling) for kw in batch_kwargs]
        if optimize and items:
            plans = [trace(self.fn, self.name, a, k) for a, k, _ in items]
            run_sync(backend.encode_ahead([img for p in plans for img in p.images]))
            common = common_prefix([p.first_prefix for p in plans])
            if len(items) > 1 and common and backend.prefix_sharing_supported:
                run_sync(backend.prefill(common))
        workers = len(items) if num_threads == "auto" else int(num_threads)
        with ThreadPoolExecutor(max(1, min(workers, 64))) as pool:
            futures = [pool.submit(lambda it=it: self._start(backend, it[2], it[0], it[1], False)) for it in items]
            _progress(futures, progress_bar, self.name)
            return [f.result() for f in futures]

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    # ---- internals --------------------------------------------------------------------------
    def _split(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, dict]:
        fields = SamplingParams.field_names() | set(SAMPLING_ALIASES)
        sampling = {k: v for k, v in kwargs.items() if k in fields and k not in self.params}
        kwargs = self.bound | {k: v for k, v in kwargs.items() if k not in sampling}
        defaults = DEFAULT_SAMPLING | {SAMPLING_ALIASES.get(k, k): v for k, v in sampling.items()}
        try:
            SamplingParams.from_dict(defaults)
        except ValueError as e:
            raise ProgramError(f"{self.name}.run() got invalid sampling defaults: {e}") from None
        return args, kwargs, defaults

    def _backend(self, backend: Backend | None) -> Backend:
        backend = backend or _default_backend
        if backend is None:
            raise ProgramError("no backend: pass backend=... or call epd.set_default_backend(epd.Runtime(...))")
        return backend

    def _start(self, backend: Backend, defaults: dict, args: tuple, kwargs: dict, stream: bool) -> ProgramState:
        state = ProgramState(backend, defaults)
        if not stream:
            return self._body(state, args, kwargs, raise_errors=True)
        threading.Thread(target=self._body, args=(state, args, kwargs, False), daemon=True).start()
        return state

    def _body(self, state: ProgramState, args: tuple, kwargs: dict, raise_errors: bool) -> ProgramState:
        try:
            state.ret_value = self.fn(state, *args, **kwargs)
            state.sync_all()
        except BaseException as e:
            state._stream.finish(e)
            if raise_errors:
                raise
            return state
        finally:
            state.backend.end_program(state.session_id)
        state._stream.finish()
        return state


def function(fn: Callable | None = None, **_options: Any) -> SglFunction | Callable[[Callable], SglFunction]:
    """Decorator: `@epd.function` turns `def prog(s, ...)` into a runnable program."""
    if fn is None:
        return lambda f: SglFunction(f)
    return SglFunction(fn)


def common_prefix(prefixes: list[list[Expr] | None]) -> list[Expr]:
    """The longest prefix of pieces every list shares (text compared by characters, images by key)."""
    if not prefixes or any(p is None for p in prefixes):
        return []
    out: list[Expr] = []
    for column in zip(*prefixes):
        first = column[0]
        if all(_same(first, p) for p in column):
            out.append(first)
            continue
        if all(isinstance(p, Text) for p in column):
            shared = _common_chars([p.text for p in column])
            if shared:
                out.append(Text(shared))
        break
    return out


def _same(a: Expr, b: Expr) -> bool:
    if isinstance(a, Image) and isinstance(b, Image):
        return a.key == b.key
    return type(a) is type(b) and not isinstance(a, Image) and a == b


def _common_chars(texts: list[str]) -> str:
    n = 0
    for chars in zip(*texts):
        if len(set(chars)) > 1:
            break
        n += 1
    return texts[0][:n]


def _progress(futures: list, enabled: bool, name: str) -> None:
    if not enabled:
        return
    from concurrent.futures import as_completed

    from tqdm import tqdm

    for _ in tqdm(as_completed(futures), total=len(futures), desc=name):
        pass

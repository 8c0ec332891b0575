"""`ProgramState`: the `s` a program writes to. Statements run asynchronously, in order, on the DSL loop;
reading a variable (`s["x"]`, `s.text()`) waits for the statements before it."""
from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from epdlang.backends.base import Backend
from epdlang.executor import submit
from epdlang.ir import Expr, Gen, Image, ProgramError, RoleBegin, RoleEnd, Select, Text, as_expr, where
from epdlang.sampling import SamplingParams
from epdlang.template import to_messages


class _Stream:
    """Text chunks as they are produced, for `text_iter`; thread-safe."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str | None, str]] = []
        self.done, self.error = False, None
        self.cond = threading.Condition()

    def put(self, var: str | None, text: str) -> None:
        with self.cond:
            self.chunks.append((var, text))
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()

    def wait(self, i: int) -> tuple[str | None, str] | None:
        """Chunk `i`, or None once the program ended without it."""
        with self.cond:
            self.cond.wait_for(lambda: i < len(self.chunks) or self.done)
            if i < len(self.chunks):
                return self.chunks[i]
            if self.error is not None:
                raise self.error
            return None


class ProgramState:
    """One program's conversation: pieces (text, images, roles), variables and their meta info."""

    def __init__(self, backend: Backend, defaults: dict | None = None, session_id: str | None = None) -> None:
        self.backend, self.defaults = backend, dict(defaults or {})
        self.session_id = session_id or uuid.uuid4().hex
        self.pieces: list[Expr] = []
        self.variables: dict[str, Any] = {}
        self.meta: dict[str, dict] = {}
        self._tail: Future | None = None
        self._stream = _Stream()
        self._fork_at = 0  # pieces inherited from the parent, for join
        self._branches: list[ProgramState] = []  # every fork's branches, joined or not
        self.ret_value: Any = None  # what the program function returned (set when `run` returns)

    # ---- writing ----------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> "ProgramState":
        expr, loc = as_expr(other), where()
        self._chain(lambda: self._execute(expr.pieces(), loc))
        return self

    def _chain(self, step: Callable[[], Any]) -> None:
        prev = self._tail

        async def run() -> None:
            if prev is not None:
                await asyncio.wrap_future(prev)
            await step()

        self._tail = submit(run())

    async def _execute(self, pieces: Sequence[Expr], loc: str) -> None:
        try:
            for piece in pieces:
                await self._execute_one(piece)
        except Exception as e:
            if not getattr(e, "_epd_located", False):
                e.add_note(f"in the statement at {loc}")
                e._epd_located = True
            raise

    async def _execute_one(self, piece: Expr) -> None:
        if isinstance(piece, Gen):
            params = SamplingParams.from_dict({**self.defaults, **piece.sampling})
            text, meta = await self.backend.generate(self.pieces, params, lambda t: self._stream.put(piece.name, t),
                                                     session_id=self.session_id)
            self._set(piece.name, text, meta)
        elif isinstance(piece, Select):
            index, meta = await self.backend.select(self.pieces, piece.choices, session_id=self.session_id)
            self._stream.put(piece.name, piece.choices[index])
            self._set(piece.name, piece.choices[index], meta)
        elif isinstance(piece, (Text, Image, RoleBegin, RoleEnd)):
            if isinstance(piece, Text):
                self._stream.put(None, piece.text)
            elif isinstance(piece, Image):
                await self.backend.add_image(piece)
            self.pieces.append(piece)
        else:
            raise ProgramError(f"{type(piece).__name__} cannot run outside tracing")

    def _set(self, name: str, value: str, meta: dict) -> None:
        self.variables[name], self.meta[name] = value, meta
        self.pieces.append(Text(value))

    # ---- reading ----------------------------------------------------------------------------
    def sync(self, timeout: float | None = None) -> "ProgramState":
        """Wait for every statement so far; re-raises the first error."""
        if self._tail is not None:
            self._tail.result(timeout)
        return self

    def sync_all(self, timeout: float | None = None) -> "ProgramState":
        """Wait for every statement of this state and of all its fork branches, joined or not (as
        SGLang does at program end); re-raises the first error."""
        self.sync(timeout)
        done = 0
        while done < len(self._branches):  # a branch may fork again while we wait
            self._branches[done].sync_all(timeout)
            done += 1
        return self

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self.variables:
            raise KeyError(f"no variable {name!r}; the program set {sorted(self.variables)}")
        return self.variables[name]

    def get_var(self, name: str) -> Any:
        return self[name]

    def set_var(self, name: str, value: Any) -> None:
        self.sync()
        self.variables[name] = value

    def get_meta_info(self, name: str) -> dict:
        self.sync()
        return self.meta.get(name, {})

    def text(self) -> str:
        self.sync()
        return self.backend.chat_template.render(self.pieces)[0]

    def messages(self) -> list[dict]:
        """OpenAI-style messages; images appear as {"type": "image"} parts."""
        self.sync()
        return to_messages(self.pieces)

    # ---- fork / join ------------------------------------------------------------------------
    def fork(self, size: int = 1) -> "ForkGroup":
        """`size` copies of this state. With several branches the shared prefix is prefilled once first;
        that prefill's meta info is `get_meta_info("__fork_prefill__")` on the parent."""
        if not isinstance(size, int) or size < 1:
            raise ProgramError(f"fork() needs a positive int, got {size!r} (at {where()})")
        branches = [ProgramState(self.backend, self.defaults, self.session_id) for _ in range(size)]
        self._branches.extend(branches)
        prev = self._tail

        async def start() -> None:
            if prev is not None:
                await asyncio.wrap_future(prev)
            for b in branches:
                b.pieces, b.variables, b.meta = list(self.pieces), dict(self.variables), dict(self.meta)
                b._fork_at = len(self.pieces)
            if size > 1 and self.pieces and self.backend.prefix_sharing_supported:
                self.meta["__fork_prefill__"] = await self.backend.prefill(self.pieces, session_id=self.session_id)

        start_future = submit(start())
        for b in branches:
            b._tail, b._stream = start_future, self._stream
        return ForkGroup(self, branches)

    # ---- streaming --------------------------------------------------------------------------
    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text as it is produced (all of it, or only variable `var_name`'s), until the program ends."""
        i = 0
        while (chunk := self._stream.wait(i)) is not None:
            i += 1
            if var_name is None or chunk[0] == var_name:
                yield chunk[1]

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        i = 0
        while (chunk := await asyncio.to_thread(self._stream.wait, i)) is not None:
            i += 1
            if var_name is None or chunk[0] == var_name:
                yield chunk[1]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.text_async_iter()

    def __repr__(self) -> str:
        return f"ProgramState(variables={sorted(self.variables)})"


class ForkGroup(Sequence[ProgramState]):
    """The branches of a fork; `join` waits for them and brings results back to the parent."""

    def __init__(self, parent: ProgramState, branches: list[ProgramState]) -> None:
        self.parent, self.branches = parent, branches

    def __getitem__(self, i):
        return self.branches[i]

    def __setitem__(self, i: int, state: ProgramState) -> None:
        if state is not self.branches[i]:  # `forks[i] += ...` stores the same state back
            raise ProgramError(f"fork branches cannot be replaced (at {where()})")

    def __len__(self) -> int:
        return len(self.branches)

    def join(self, mode: str = "gather_variable") -> None:
        """`gather_variable`: each variable set in the branches becomes a list on the parent.
        `concate_and_append`: the branches' new pieces are appended to the parent in order."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ProgramError(f"join() mode must be gather_variable or concate_and_append (at {where()})")
        tails = [b._tail for b in self.branches]
        parent = self.parent

        async def join() -> None:
            for t in tails:
                await asyncio.wrap_future(t)
            for b in self.branches:
                new = b.pieces[b._fork_at:]
                if mode == "concate_and_append":
                    parent.pieces.extend(new)
            if mode == "gather_variable":
                names = {n for b in self.branches for n in b.variables if b.variables[n] is not parent.variables.get(n)}
                for n in sorted(names):
                    parent.variables[n] = [b.variables.get(n) for b in self.branches]
                    parent.meta[n] = {"branches": [b.meta.get(n, {}) for b in self.branches]}

        parent._chain(join)

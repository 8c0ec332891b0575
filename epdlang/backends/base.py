"""The backend interface a program state talks to. All methods run on the DSL loop."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams
from epdlang.template import QWEN2_VL, ChatTemplate

OnText = Callable[[str], None]


class Backend:
    """What a runtime offers the DSL. Capabilities say which compiler passes take effect."""

    chat_template: ChatTemplate = QWEN2_VL
    encode_ahead_supported = False
    prefix_sharing_supported = False
    scoring_supported = False

    async def encode_ahead(self, images: Sequence[Image]) -> None:
        """Start encoding `images` now, without waiting for it (no-op where unsupported)."""

    async def add_image(self, image: Image) -> None:
        """An image joined the prompt; a backend that reads images now raises its `ImageError` here."""

    async def prefill(self, pieces: Sequence[Expr]) -> dict[str, Any]:
        """Prefill a prompt so that later prompts sharing it hit the prefix cache."""
        return {}

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText) -> tuple[str, dict]:
        """Continue the prompt; stream text through `on_text`; return the text and meta info."""
        raise NotImplementedError

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str]) -> tuple[int, dict]:
        """Pick the index of one of `choices` to continue the prompt; return it and meta info."""
        raise NotImplementedError

    def end_program(self, session_id: str) -> None:
        """A program finished; its cached KV may be released."""

    def close(self) -> None:
        """Release whatever the backend holds."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

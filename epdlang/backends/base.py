"""The backend interface a program state talks to (all methods run on the DSL loop), and what backends share."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Callable, Sequence

from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams
from epdlang.template import QWEN2_VL, ChatTemplate

OnText = Callable[[str], None]


class Backend:
    """What a runtime offers the DSL. Capabilities say which compiler passes take effect.

    `session_id` names the program a request belongs to (fork branches share it): a runtime keeps the
    program's requests on the instances that hold its KV until `end_program(session_id)`.
    """

    chat_template: ChatTemplate = QWEN2_VL
    encode_ahead_supported = False
    prefix_sharing_supported = False
    scoring_supported = False

    async def encode_ahead(self, images: Sequence[Image]) -> None:
        """Start encoding `images` now, without waiting for it (no-op where unsupported)."""

    async def add_image(self, image: Image) -> None:
        """An image joined the prompt; a backend that reads images now raises its `ImageError` here."""

    async def prefill(self, pieces: Sequence[Expr], *, session_id: str | None = None) -> dict[str, Any]:
        """Prefill a prompt so that later prompts sharing it hit the prefix cache."""
        return {}

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText, *,
                       session_id: str | None = None) -> tuple[str, dict]:
        """Continue the prompt; stream text through `on_text`; return the text and meta info."""
        raise NotImplementedError

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str], *,
                     session_id: str | None = None) -> tuple[int, dict]:
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


def pick_choice(token_logprobs: Sequence[Sequence[float]], cached_tokens: Sequence[int],
                prompt_tokens: int) -> tuple[int, dict[str, Any]]:
    """The choice with the highest mean token logprob (ties: the first), and select's meta info."""
    normalized = [sum(lps) / max(len(lps), 1) for lps in token_logprobs]
    best = max(range(len(normalized)), key=lambda i: (normalized[i], -i))
    meta = {"normalized_prompt_logprobs": normalized, "input_token_logprobs": [list(x) for x in token_logprobs],
            "cached_tokens": list(cached_tokens), "prompt_tokens": prompt_tokens, "completion_tokens": 0}
    return best, meta


def image_url(source: Any) -> str:
    """An image as a URL a server can take: http(s) and data URLs as they are, anything else as a data URL."""
    if isinstance(source, str) and source.startswith(("http://", "https://", "data:")):
        return source
    if isinstance(source, (str, Path)):
        data, mime = Path(source).read_bytes(), "image/png"
    elif isinstance(source, bytes):
        data, mime = source, "image/png"
    else:  # PIL image
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"

"""`epd.OpenAI`: any OpenAI-compatible chat server as a DSL backend (degraded).

What it cannot do, and warns about once at first use: no encode-ahead (images travel inline with
each request), no prefill-only select scoring (select asks the server for a constrained choice via
the `regex` extension, and if the server refuses it, generates freely and matches the closest
choice), no explicit shared-prefix prefill (the server's own prefix cache may still help), no sessions
(`session_id` is not sent: plain OpenAI servers refuse unknown fields), and a partial assistant message
before a gen is sent as a finished assistant message.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

from epdlang.backends.base import Backend, OnText, image_url
from epdlang.errors import EpdError
from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams
from epdlang.template import open_role, to_messages

DEGRADED = ("epd.OpenAI backend is degraded: no encode-ahead, no prefill-only select scoring "
            "(select uses a regex-constrained or free generation matched to a choice), no shared-prefix prefill")


class OpenAI(Backend):
    """Talks to `{base_url}/chat/completions` (base_url like http://host:port/v1) with httpx."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None,
                 timeout: float = 120.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url, self.model = base_url.rstrip("/"), model
        self._client_args = {"headers": headers, "timeout": timeout}
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._warned = False

    def _client(self):
        import asyncio

        import httpx

        key = id(asyncio.get_running_loop())
        if key not in self._clients:
            self._clients[key] = httpx.AsyncClient(**self._client_args)
        return self._clients[key]

    def _warn(self) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(DEGRADED, RuntimeWarning, stacklevel=2)

    async def _chat(self, pieces: Sequence[Expr], body: dict) -> dict:
        self._warn()
        messages = to_messages(pieces, image_part=_image_part)
        if open_role(pieces) == "assistant" and messages and messages[-1]["role"] == "assistant":
            if not messages[-1]["content"]:
                messages.pop()
        payload = {"model": self.model, "messages": messages} | body
        resp = await self._client().post(f"{self.base_url}/chat/completions", json=payload)
        if resp.status_code >= 400:
            raise EpdError(f"server answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText, *,
                       session_id: str | None = None) -> tuple[str, dict]:
        data = await self._chat(pieces, _body(params))
        text = data["choices"][0]["message"].get("content") or ""
        on_text(text)
        usage = data.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return text, {"id": data.get("id"), "finish_reason": data["choices"][0].get("finish_reason"),
                      "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
                      "cached_tokens": details.get("cached_tokens", 0)}

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str], *,
                     session_id: str | None = None) -> tuple[int, dict]:
        longest = max(len(c) for c in choices)
        regex = "(" + "|".join(re.escape(c) for c in choices) + ")"
        params = SamplingParams(max_new_tokens=longest + 8, regex=regex)
        try:
            text, meta = await self.generate(pieces, params, lambda t: None)
            how = "regex"
        except EpdError:
            text, meta = await self.generate(pieces, params.replace(regex=None), lambda t: None)
            how = "free generation"
        return _closest(text, choices), meta | {"select_method": how, "generated": text}

    def close(self) -> None:
        self._clients.clear()


def _body(params: SamplingParams) -> dict[str, Any]:
    body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.regex:
        body["regex"] = params.regex
    if params.json_schema:
        import json

        schema = {"name": "schema", "schema": json.loads(params.json_schema)}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return body


def _closest(text: str, choices: Sequence[str]) -> int:
    """The choice the text starts with (longest first), else the one sharing the longest prefix."""
    t = text.strip()
    for i in sorted(range(len(choices)), key=lambda i: -len(choices[i])):
        if t.startswith(choices[i]):
            return i
    shared = [len(_common(t.lower(), c.lower())) for c in choices]
    return max(range(len(choices)), key=lambda i: (shared[i], -i))


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _image_part(img: Image) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": image_url(img.source)}}

"""`epd.RuntimeEndpoint`: an epdlang server (`epd serve`) as a DSL backend, over its stage-aware protocol.

Every compiler pass takes effect, as with `epd.Runtime`:
- encode-ahead: at program start each image the server does not hold yet is uploaded once (`POST /epd/images`
  preprocesses and keeps it, and starts encoding it); every later statement and turn names it `epd-image:<hash>`;
- prefill and select are prefill-only `/generate` requests (`max_new_tokens` 0); select scores the token ids
  `/tokenize` gives, exactly as `epd.Runtime.select` does;
- every request carries the program's `session_id`, and `end_program` sends `POST /epd/end_session`.
Prompts render with the same chat template as `epd.Runtime`, so the server sees the same token ids.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx

from epdlang.backends.base import Backend, OnText, image_url, pick_choice
from epdlang.errors import EpdError, ImageError, InvalidRequest, UnknownImage
from epdlang.ir import Expr, Image
from epdlang.sampling import SamplingParams
from epdlang.template import template_for

log = logging.getLogger(__name__)
MAX_KNOWN_IMAGES = 4096
URL_PREFIXES = ("http://", "https://", "data:")
SGLANG_NAMES = {"seed": "sampling_seed"}
REQUEST_LEVEL = ("logprobs", "prompt_logprobs_start")  # SGLang takes these beside sampling_params


@dataclass(frozen=True)
class Uploaded:
    key: str  # the program's `Image.key`
    id: str  # "epd-image:<content hash>"
    num_tokens: int  # image tokens in the prompt


class RuntimeEndpoint(Backend):
    """Talks to `base_url` (like http://127.0.0.1:30000) with httpx; checks at once that it is an epdlang server."""

    encode_ahead_supported = prefix_sharing_supported = scoring_supported = True

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        info = probe(self.base_url, api_key)
        if info is None:
            raise EpdError(f"{self.base_url} is not an epdlang server; use epd.OpenAI for other servers")
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._sync = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
        self.max_images = max(1, int(info["epd"]["max_images"]))  # per upload request
        self.chat_template = template_for(str(info["epd"].get("model_type", "")))
        self._known: OrderedDict[str, Uploaded] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def server_info(self) -> dict[str, Any]:
        """`/get_server_info`: engine figures, and under "epd" the server's image-store counters."""
        with _transport_errors(self.base_url):
            resp = self._sync.get("/get_server_info")
        return _json(resp)

    # ---- images -----------------------------------------------------------------------------
    async def encode_ahead(self, images: Sequence[Image]) -> None:
        """Start encoding every image now: images the server holds are named by id (which also keeps them in
        its store), the others are uploaded. If this fails, each statement uploads its own image when it runs
        (and raises that image's error)."""
        readable = list({img.key: img for img in images if _readable(img)}.values())
        try:
            await self._touch([self._known[img.key] for img in readable if img.key in self._known])
            await self._ensure(readable)
        except EpdError as e:
            log.info("encode-ahead upload failed, images go up with their statements: %s", e)

    async def _touch(self, uploaded: list[Uploaded]) -> None:
        if uploaded:
            try:
                await self._post("/epd/images", {"images": [u.id for u in uploaded]})
            except UnknownImage:
                self._forget(uploaded)  # uploaded again next

    async def add_image(self, image: Image) -> None:
        await self._ensure([image])

    async def _ensure(self, images: Sequence[Image]) -> list[Uploaded]:
        """Each image's server id; uploads those the server does not have yet, each once, even when several
        statements ask for it at the same time."""
        fresh = list({i.key: i for i in images if i.key not in self._known and i.key not in self._inflight}.values())
        if fresh:
            task = asyncio.ensure_future(self._upload(fresh))
            self._inflight |= {img.key: task for img in fresh}
            task.add_done_callback(lambda t: self._settle(t, fresh))
        tasks = {self._inflight[i.key] for i in images if i.key in self._inflight}
        found = {u.key: u for done in await asyncio.gather(*tasks) for u in done}
        return [found.get(i.key) or self._known[i.key] for i in images]

    def _settle(self, task: asyncio.Future, images: list[Image]) -> None:
        for img in images:
            if self._inflight.get(img.key) is task:
                del self._inflight[img.key]

    async def _upload(self, images: list[Image]) -> list[Uploaded]:
        refs = await asyncio.to_thread(lambda: [_upload_ref(img) for img in images])
        n = self.max_images
        parts = await asyncio.gather(*(self._post_images(images[k:k + n], refs[k:k + n])
                                       for k in range(0, len(images), n)))
        return [u for part in parts for u in part]

    async def _post_images(self, images: list[Image], refs: list[str]) -> list[Uploaded]:
        data = await self._post("/epd/images", {"images": refs}, ImageError)
        out = [Uploaded(img.key, d["id"], d["num_tokens"]) for img, d in zip(images, data["images"])]
        for u in out:
            self._known[u.key] = u
            self._known.move_to_end(u.key)
        while len(self._known) > MAX_KNOWN_IMAGES:
            self._known.popitem(last=False)
        return out

    def _forget(self, uploaded: Sequence[Uploaded]) -> None:
        for u in uploaded:
            if self._known.get(u.key) == u:
                del self._known[u.key]

    # ---- requests ---------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in self._clients:
            self._clients[loop] = httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                                    timeout=self._timeout)
        return self._clients[loop]

    async def _post(self, path: str, body: dict, error: type[EpdError] = InvalidRequest) -> dict:
        with _transport_errors(self.base_url):
            resp = await self._client().post(path, json=body)
        return _json(resp, error)

    async def _generate(self, prompt: dict[str, Any], images: Sequence[Image], params: SamplingParams,
                        session_id: str | None, on_text: OnText | None = None) -> tuple[str, dict]:
        """One streamed `/generate`; if the server no longer holds an image, it is uploaded again, once."""
        uploaded = await self._ensure(images)
        try:
            return await self._stream(_generate_body(prompt, uploaded, params, session_id), on_text)
        except UnknownImage:
            self._forget(uploaded)
        uploaded = await self._ensure(images)
        return await self._stream(_generate_body(prompt, uploaded, params, session_id), on_text)

    async def _stream(self, body: dict, on_text: OnText | None) -> tuple[str, dict]:
        text, info = "", None
        with _transport_errors(self.base_url):
            async with self._client().stream("POST", "/generate", json=body) as resp:
                if resp.status_code >= 400:
                    raise _error(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise _typed(500 if event["error"].get("type") == "server_error" else 400, event["error"])
                    if on_text is not None and len(event["text"]) > len(text):
                        on_text(event["text"][len(text):])
                    text, info = event["text"], event["meta_info"]
        reason = (info or {}).get("finish_reason") or {}
        if info is None or reason.get("type") == "abort":
            raise EpdError(f"request failed: {reason.get('message', 'no output')}")
        return text, info

    # ---- backend ----------------------------------------------------------------------------
    async def prefill(self, pieces: Sequence[Expr], *, session_id: str | None = None) -> dict[str, Any]:
        if not pieces:
            return {}
        text, images = self.chat_template.render(pieces)
        _, info = await self._generate({"text": text}, images, SamplingParams(max_new_tokens=0), session_id)
        return _meta(info)

    async def generate(self, pieces: Sequence[Expr], params: SamplingParams, on_text: OnText, *,
                       session_id: str | None = None) -> tuple[str, dict]:
        text, images = self.chat_template.render(pieces)
        out, info = await self._generate({"text": text}, images, params, session_id, on_text)
        return out, _meta(info)

    async def select(self, pieces: Sequence[Expr], choices: Sequence[str], *,
                     session_id: str | None = None) -> tuple[int, dict]:
        """Score each choice by its mean token logprob after the prompt, in prefill-only requests on token ids."""
        text, images = self.chat_template.render(pieces)
        prompt, *choice_ids = (await self._post("/tokenize", {"prompt": [text, *choices],
                                                              "add_special_tokens": False}))["tokens"]
        start = len(prompt) + sum(u.num_tokens - 1 for u in await self._ensure(images))  # each pad expands
        if len(choices) > 1:  # the prompt once, then every choice reuses it from the prefix cache
            await self._generate({"input_ids": prompt}, images, SamplingParams(max_new_tokens=0), session_id)
        score = SamplingParams(max_new_tokens=0, prompt_logprobs_start=start)
        outs = await asyncio.gather(*(self._generate({"input_ids": prompt + c}, images, score, session_id)
                                      for c in choice_ids))
        token_lps = [[lp for lp, *_ in info["input_token_logprobs"] if lp is not None] for _, info in outs]
        return pick_choice(token_lps, [info["cached_tokens"] for _, info in outs], start)

    def end_program(self, session_id: str) -> None:
        """Best effort: if this is lost, the server only keeps the session pinned to its instances longer."""
        try:
            with _transport_errors(self.base_url):
                _json(self._sync.post("/epd/end_session", json={"session_id": session_id}))
        except EpdError as e:
            log.warning("end_session for %s failed: %s", session_id, e)

    def close(self) -> None:
        clients, self._clients = self._clients, {}
        for loop, client in clients.items():
            if loop.is_running() and loop is not _running_loop():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(5)
        self._sync.close()


def probe(base_url: str, api_key: str | None = None) -> dict[str, Any] | None:
    """The server info of an epdlang server at `base_url`; None if the server there is another kind."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with _transport_errors(base_url):
        resp = httpx.get(f"{base_url.rstrip('/')}/get_server_info", headers=headers, timeout=30.0)
    if resp.status_code in (401, 403):
        raise _error(resp.status_code, resp.content)
    try:
        info = resp.json() if resp.status_code == 200 else {}
    except ValueError:
        return None
    return info if isinstance(info, dict) and info.get("version") == "epdlang" and "epd" in info else None


def _generate_body(prompt: dict[str, Any], uploaded: Sequence[Uploaded], params: SamplingParams,
                   session_id: str | None) -> dict[str, Any]:
    return prompt | {"image_data": [u.id for u in uploaded], "sampling_params": sampling_fields(params),
                     "stream": True, "session_id": session_id} | logprob_fields(params)


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """`SamplingParams` as SGLang's `sampling_params` (unset fields left out)."""
    values = dataclasses.asdict(params)
    return {SGLANG_NAMES.get(k, k): v for k, v in values.items() if k not in REQUEST_LEVEL and v is not None}


def logprob_fields(params: SamplingParams) -> dict[str, Any]:
    if params.logprobs is None and params.prompt_logprobs_start is None:
        return {}
    start = -1 if params.prompt_logprobs_start is None else params.prompt_logprobs_start
    return {"return_logprob": True, "top_logprobs_num": params.logprobs or 0, "logprob_start_len": start}


def _meta(info: dict) -> dict[str, Any]:
    """SGLang's meta_info in the shape `epd.Runtime` gives."""
    reason = info.get("finish_reason") or {}
    return {"id": info.get("id"), "finish_reason": reason.get("type"), "matched_stop": reason.get("matched"),
            "prompt_tokens": info.get("prompt_tokens"), "completion_tokens": info.get("completion_tokens"),
            "cached_tokens": info.get("cached_tokens", 0)}


def _readable(img: Image) -> bool:
    src = img.source
    return not isinstance(src, (str, Path)) or str(src).startswith(URL_PREFIXES) or Path(src).is_file()


def _upload_ref(img: Image) -> str:
    """Files are read here, on the client: the server's media policy does not cover the client's disk."""
    try:
        return image_url(img.source)
    except OSError as e:
        raise ImageError(f"cannot read image file {str(img.source)[:200]!r}: {e.strerror or e}") from e


def _json(resp: httpx.Response, error: type[EpdError] = InvalidRequest) -> dict:
    if resp.status_code >= 400:
        raise _error(resp.status_code, resp.content, error)
    return resp.json()


def _error(status: int, content: bytes, error: type[EpdError] = InvalidRequest) -> EpdError:
    try:
        body = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        body = {"message": content[:300].decode(errors="replace")}
    return _typed(status, body, error)


def _typed(status: int, body: dict, error: type[EpdError] = InvalidRequest) -> EpdError:
    """The server's OpenAI-style error as a typed exception (`UnknownImage` for a forgotten image id)."""
    if body.get("code") == UnknownImage.code:
        error = UnknownImage
    elif not 400 <= status < 500:
        error = EpdError
    exc = error(f"server answered {status}: {body.get('message')}")
    exc.status = status
    return exc


@contextlib.contextmanager
def _transport_errors(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as e:
        raise EpdError(f"request to {url} failed: {type(e).__name__}: {e}") from e


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

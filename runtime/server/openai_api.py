"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from runtime.server.errors import ApiError, error_body, from_exception
from runtime.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_choice,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    envelope,
    token_ids_of,
    usage,
)
from runtime.server.serving import Accum, EngineStream, Frontend, collect, guarded, merged, token_texts
from runtime.server.sse import DONE, EventStream, event

router = APIRouter()


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    return model.model_validate_json(body or b"null", strict=True)


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its raw body as `model`: the schema then shows the real JSON body
    (pydantic's `$defs` inlined, as an operation cannot add components), while the route keeps parsing itself."""
    schema = model.model_json_schema()
    body = _inline(schema, schema.pop("$defs", {}), ())
    return {"requestBody": {"content": {"application/json": {"schema": body}}, "required": True}}


def _inline(node: Any, defs: dict, seen: tuple[str, ...]) -> Any:
    """`node` with every `{"$ref": "#/$defs/X", ...}` replaced by X itself (merged with the ref's siblings)."""
    if isinstance(node, list):
        return [_inline(v, defs, seen) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise ValueError(f"recursive model {name} cannot be inlined")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _inline(defs[name], defs, (*seen, name)) | _inline(rest, defs, seen)
    return {k: _inline(v, defs, seen) for k, v in node.items()}


def check_model(request: Request, name: str) -> None:
    state = request.app.state
    if name not in (state.config.served_model_name, state.config.model_path):
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                            f"{state.config.served_model_name!r}", "model_not_found", "model")


def frontend(request: Request) -> Frontend:
    fe = request.app.state.frontend
    if fe is None:
        raise ApiError(503, "the engine is still loading", "not_ready")
    return fe


@router.get("/v1/models")
async def models(request: Request) -> dict:
    cfg = request.app.state.config
    card = {"id": cfg.served_model_name, "object": "model", "created": request.app.state.started,
            "owned_by": "epdlang", "root": cfg.model_path}
    return {"object": "list", "data": [card]}


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest))
async def chat_completions(request: Request):
    fe = frontend(request)
    req: ChatCompletionRequest = parse(ChatCompletionRequest, await request.body())
    check_model(request, req.model)
    rid = f"chatcmpl-{uuid.uuid4().hex}"

    async def start() -> list[EngineStream]:
        prepared = await fe.prepare_chat([m.as_dict() for m in req.messages])
        budget = fe.max_new_tokens(len(prepared.input_ids), req.max_completion_tokens or req.max_tokens)
        params = req.sampling(budget, req.top_n(), fe.limits.max_stop)
        return await fe.start(fe.requests(rid, prepared, params, req.n, req.session_id))

    streams = await guarded(request, start())
    shape = _Shape(rid, "chat.completion", int(time.time()), req.model, req.n)
    if req.stream:
        return EventStream(_chat_events(streams, shape, req, fe))
    results = await guarded(request, collect(streams))
    _raise_engine_error(results)
    texts = token_texts(fe.processor.tokenizer, {t for r in results for t in token_ids_of(r.logprobs)})
    choices = [chat_choice(i, r, chat_logprobs(r.logprobs, texts) if req.logprobs else None)
               for i, r in enumerate(results)]
    return envelope(rid, shape.obj, shape.created, shape.model, choices, usage(results, req.n))


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    fe = frontend(request)
    req: CompletionRequest = parse(CompletionRequest, await request.body())
    check_model(request, req.model)
    rid = f"cmpl-{uuid.uuid4().hex}"

    async def start() -> list[EngineStream]:
        msgs = []
        for i, p in enumerate(req.prompts()):
            prepared = await (fe.prepare_prompt(prompt=p) if isinstance(p, str) else fe.prepare_prompt(input_ids=p))
            params = req.sampling(fe.max_new_tokens(len(prepared.input_ids), req.max_tokens), req.logprobs,
                                  fe.limits.max_stop)
            msgs += fe.requests(f"{rid}-p{i}", prepared, params, req.n, req.session_id)
        return await fe.start(msgs)

    streams = await guarded(request, start())
    shape = _Shape(rid, "text_completion", int(time.time()), req.model, req.n)
    if req.stream:
        return EventStream(_completion_events(streams, shape, req, fe))
    results = await guarded(request, collect(streams))
    _raise_engine_error(results)
    texts = token_texts(fe.processor.tokenizer, {t for r in results for t in token_ids_of(r.logprobs)})
    choices = [completion_choice(i, r, completion_logprobs(r.logprobs, texts) if req.logprobs is not None
                                 else None) for i, r in enumerate(results)]
    return envelope(rid, shape.obj, shape.created, shape.model, choices, usage(results, req.n))


class _Shape:
    def __init__(self, rid: str, obj: str, created: int, model: str, n: int) -> None:
        self.rid, self.obj, self.created, self.model, self.n = rid, obj, created, model, n

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> bytes:
        return event(envelope(self.rid, self.obj if self.obj == "text_completion" else "chat.completion.chunk",
                              self.created, self.model, choices, usage_))


def _raise_engine_error(results: list[Accum]) -> None:
    failed = next((r for r in results if r.finish_reason == "error"), None)
    if failed is not None:
        raise ApiError(500, f"the engine failed this request: {failed.error}", "engine_error")


async def _events(streams: list[EngineStream], shape: _Shape, include_usage: bool,
                  choice: Callable[[int, object, dict], dict | None], head: list[bytes]) -> AsyncIterator[bytes]:
    """The shared SSE loop: head chunks, one chunk per non-empty delta, optional usage, [DONE]."""
    accs = [s.acc for s in streams]
    try:
        for chunk in head:
            yield chunk
        async for i, out in merged(streams):
            body = choice(i, out, accs[i])
            if body is not None:
                yield shape.chunk([body])
        if include_usage:
            yield shape.chunk([], usage(accs, shape.n))
    except Exception as exc:  # reported in-band: the status line has already gone out
        status, message, code, param = from_exception(exc)
        yield event(error_body(status, message, code, param))
    yield DONE


def _chat_events(streams: list[EngineStream], shape: _Shape, req: ChatCompletionRequest,
                 fe: Frontend) -> AsyncIterator[bytes]:
    def choice(i: int, out, acc: Accum) -> dict | None:
        if not (out.new_text or out.logprobs or out.finished):
            return None
        lps = None
        if req.logprobs:
            lps = chat_logprobs(out.logprobs, token_texts(fe.processor.tokenizer, token_ids_of(out.logprobs)))
        delta = {"content": out.new_text} if out.new_text else {}
        return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": out.finish_reason,
                "matched_stop": out.matched_stop if out.finished else None}

    head = [shape.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}]) for i in range(len(streams))]
    return _events(streams, shape, req.include_usage, choice, head)


def _completion_events(streams: list[EngineStream], shape: _Shape, req: CompletionRequest,
                       fe: Frontend) -> AsyncIterator[bytes]:
    def choice(i: int, out, acc: Accum) -> dict | None:
        if not (out.new_text or out.logprobs or out.finished):
            return None
        lps = None
        if req.logprobs is not None:
            texts = token_texts(fe.processor.tokenizer, token_ids_of(out.logprobs))
            lps = completion_logprobs(out.logprobs, texts, len(acc.text) - len(out.new_text))
        return {"index": i, "text": out.new_text, "logprobs": lps, "finish_reason": out.finish_reason,
                "matched_stop": out.matched_stop if out.finished else None}

    return _events(streams, shape, req.include_usage, choice, [])

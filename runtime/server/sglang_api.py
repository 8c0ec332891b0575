"""SGLang-native routes: /generate, /tokenize, /get_model_info, /model_info, /flush_cache, /get_server_info."""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from runtime.server.errors import error_body, from_exception
from runtime.server.openai_api import frontend, json_body, parse
from runtime.server.serving import EngineStream, Frontend, check_logprob_start, collect, guarded, merged, token_texts
from runtime.server.sglang_protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateReqInput,
    LogprobOptions,
    SglSampling,
    TokenizeReqInput,
    logprob_ids,
    output,
)
from runtime.server.sse import DONE, EventStream, event

router = APIRouter()


def _model_info(request: Request) -> dict:
    cfg = request.app.state.config
    processor = frontend(request).processor
    return {"model_path": cfg.model_path, "tokenizer_path": cfg.model_path, "is_generation": True,
            "preferred_sampling_params": None, "weight_version": "default", "has_image_understanding": True,
            "has_audio_understanding": False, "model_type": processor.model_type,
            "architectures": [processor.model_config.architecture]}


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict:
    return _model_info(request)


@router.get("/model_info")
async def model_info(request: Request) -> dict:
    return _model_info(request)


@router.get("/get_server_info")
async def server_info(request: Request) -> dict:
    fe = frontend(request)
    cfg = request.app.state.config
    snapshot = await fe.deployment.snapshot()
    epd = fe.images.info() | {"max_images": fe.limits.max_images,  # what epd.RuntimeEndpoint needs to know
                               "model_type": fe.processor.model_type}
    integrity = await fe.deployment.integrity() if request.query_params.get("integrity") else None
    return {"model_path": cfg.model_path, "served_model_name": cfg.served_model_name, "pid": os.getpid(),
            "segment_prefix": fe.deployment.segment_prefix,
            "engine": snapshot, "epd": epd, "integrity": integrity, "version": "epdlang"}


@router.post("/tokenize", openapi_extra=json_body(TokenizeReqInput))
async def tokenize(request: Request) -> dict:
    fe = frontend(request)
    req: TokenizeReqInput = parse(TokenizeReqInput, await request.body())
    texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    ids = await fe.tokenize(texts, req.add_special_tokens)
    one = isinstance(req.prompt, str)
    return {"tokens": ids[0] if one else ids, "count": len(ids[0]) if one else [len(i) for i in ids],
            "max_model_len": fe.limits.max_total_tokens}


@router.get("/flush_cache")
@router.post("/flush_cache")  # two routes, so the schema has one operation id per method
async def flush_cache(request: Request) -> Response:
    fe = frontend(request)
    ok = await fe.deployment.flush_cache()
    text = "Cache flushed.\n" if ok else "Cache not flushed: requests are running.\n"
    return Response(text, status_code=200 if ok else 400, media_type="text/plain")


@router.post("/generate", openapi_extra=json_body(GenerateReqInput))
async def generate(request: Request):
    fe = frontend(request)
    req: GenerateReqInput = parse(GenerateReqInput, await request.body())
    jobs: list[tuple[EngineStream, LogprobOptions]] = []

    async def start() -> list[EngineStream]:
        msgs, opts = await _requests(fe, req)
        streams = await fe.start(msgs)
        jobs.extend(zip(streams, opts))
        return streams

    t0 = time.perf_counter()
    streams = await guarded(request, start())
    index = req.is_batch or len(streams) > 1
    if req.stream:
        return EventStream(_stream(jobs, fe, t0, index))
    await guarded(request, collect(streams))
    outs = [_output(fe, s, o, t0, None) for s, o in jobs]
    return Response(orjson.dumps(outs if index else outs[0]), media_type="application/json")


async def _requests(fe: Frontend, req: GenerateReqInput) -> tuple[list, list[LogprobOptions]]:
    prompts = req.prompts()
    n = len(prompts)
    images = req.images(n)
    fe.check_image_count([r for refs in images for r in refs])
    columns = zip(prompts, images, req.per_prompt("sampling_params", n, SglSampling()),
                  req.per_prompt("rid", n, None), req.per_prompt("return_logprob", n, False),
                  req.per_prompt("logprob_start_len", n, -1), req.per_prompt("top_logprobs_num", n, 0))
    msgs, opts = [], []
    for prompt, refs, sp, rid, want_lp, start, top_n in columns:
        loaded = await fe.load_images(refs, raw_base64=True)
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        prepared = await fe.prepare_prompt(prompt=text, input_ids=ids, images=loaded)
        plen = len(prepared.input_ids)
        lp_start = (plen - 1 if start == -1 else start) if want_lp else None
        check_logprob_start(lp_start, plen)
        requested = DEFAULT_MAX_NEW_TOKENS if sp.max_new_tokens is None else sp.max_new_tokens
        budget = fe.max_new_tokens(plen, requested)
        params = sp.to_params(budget, top_n if want_lp else None, lp_start, fe.limits.max_stop)
        samples = 1 if sp.n is None else sp.n
        new = fe.requests(rid or uuid.uuid4().hex, prepared, params, samples, req.session_id)
        msgs += new
        opts += [LogprobOptions(want_lp, lp_start, top_n, req.return_text_in_logprobs, prepared.input_ids)] * len(new)
    return msgs, opts


def _output(fe: Frontend, stream: EngineStream, opts: LogprobOptions, t0: float, index: int | None,
            sent: int = 0) -> dict:
    texts = token_texts(fe.processor.tokenizer, logprob_ids(stream.acc, opts, sent))
    return output(stream.acc, opts, texts, time.perf_counter() - t0, index, sent)


async def _stream(jobs: list[tuple[EngineStream, LogprobOptions]], fe: Frontend, t0: float,
                  index: bool) -> AsyncIterator[bytes]:
    """SGLang's stream: each event carries one request's cumulative text and output ids, and the logprobs
    of the tokens that are new since that request's previous event. No event goes out before the request
    has text, except its last (an empty answer); an event that would carry nothing new is skipped."""
    sent = [0] * len(jobs)  # output tokens already covered by an event, per job
    done = [False] * len(jobs)
    try:
        async for i, _ in merged([s for s, _ in jobs]):
            stream, opts = jobs[i]
            acc = stream.acc
            fresh = len(acc.token_ids) > sent[i] or (acc.finished and not done[i])
            if not fresh or not (acc.text or acc.finished):
                continue
            yield event(_output(fe, stream, opts, t0, i if index else None, sent[i]))
            sent[i], done[i] = len(acc.token_ids), acc.finished
    except Exception as exc:
        status, message, code, param = from_exception(exc)
        yield event(error_body(status, message, code, param))
    yield DONE

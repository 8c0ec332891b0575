"""epdlang: an SGLang-style DSL for multimodal programs, compiled to a stage plan. See docs/dsl.md.

    import epdlang as epd

    @epd.function
    def qa(s, img, question):
        s += epd.user(epd.image(img) + question)
        s += epd.assistant(epd.gen("answer", max_tokens=64))

    with epd.Runtime() as rt:             # the embedded tiny model; or epd.RuntimeEndpoint(url) for `epd serve`
        print(qa.run(img="cat.png", question="What is it?", backend=rt)["answer"])

Importing epdlang never imports torch: `Runtime` loads the engine lazily.
"""
from __future__ import annotations

from typing import Any

from epdlang.backends.base import Backend
from epdlang.errors import EpdError, ImageError, InvalidRequest, InvalidSamplingParams, UnknownImage
from epdlang.function import SglFunction, function, get_default_backend, set_default_backend
from epdlang.ir import (
    ProgramError,
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from epdlang.sampling import SamplingParams
from epdlang.state import ForkGroup, ProgramState
from epdlang.tracing import Plan, TraceStop

_LAZY = {"Runtime": "epdlang.backends.runtime", "RuntimeEndpoint": "epdlang.backends.endpoint",
         "OpenAI": "epdlang.backends.openai"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'epdlang' has no attribute {name!r}")


__all__ = [
    "Backend", "EpdError", "ForkGroup", "ImageError", "InvalidRequest", "InvalidSamplingParams", "OpenAI",
    "Plan", "ProgramError", "ProgramState", "Runtime", "RuntimeEndpoint", "SamplingParams", "SglFunction",
    "TraceStop", "UnknownImage", "assistant", "assistant_begin", "assistant_end", "function", "gen",
    "get_default_backend", "image", "select", "set_default_backend", "system", "system_begin", "system_end",
    "user", "user_begin", "user_end",
]

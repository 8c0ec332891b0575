"""The degraded `epd.OpenAI` backend against a real `epd serve tiny`."""
from __future__ import annotations

import json

import pytest

import epdlang as epd
from images import make_image

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.timeout(120)


@epd.function
def qa(s, img):
    s += epd.system("Be brief.")
    s += epd.user(epd.image(img) + "What color is it?")
    s += epd.assistant(epd.gen("answer", max_tokens=6))
    s += epd.user("Is it red?")
    s += epd.assistant(epd.select("red", choices=["yes", "no"]))
    s += epd.user("JSON please.")
    s += epd.assistant(epd.gen("obj", max_tokens=30, json_schema={
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
        "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}))


def test_openai_backend_runs_degraded(server):
    backend = epd.OpenAI(f"{server.url}/v1", model=server.model, api_key=server.api_key)
    with pytest.warns(RuntimeWarning, match="degraded"):
        state = qa.run(make_image("red"), backend=backend)
    assert state["answer"] and state.get_meta_info("answer")["completion_tokens"] <= 6
    assert state["red"] in ("yes", "no")
    assert state.get_meta_info("red")["select_method"] == "regex"  # the server takes the regex extension
    assert isinstance(json.loads(state["obj"])["ok"], bool)
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2

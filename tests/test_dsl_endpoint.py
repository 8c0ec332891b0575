"""`epd.RuntimeEndpoint` against a real `epd serve tiny`: the same outputs as `epd.Runtime`, each image uploaded
and encoded once per program, select scored as the runtime scores it, and the protocol's errors."""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import epdlang as epd
from epdlang.backends.endpoint import Uploaded
from images import make_image
from server_helpers import data_url

pytest_plugins = ["server_fixture"]
pytestmark = pytest.mark.timeout(180)

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
PROGRAM_NAMES = sorted(p.stem for p in PROGRAMS.glob("*.py") if not p.name.startswith("_"))
RUN_SPECIFIC = {"id", "cached_tokens"}  # meta that depends on what ran before, not on the program


@pytest.fixture(scope="module")
def rt(tiny_model_dir):
    with epd.Runtime(model=tiny_model_dir, kv_cache_bytes=64 << 20, max_model_len=4096) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def endpoint(server):
    with epd.RuntimeEndpoint(server.url, api_key=server.api_key) as backend:
        yield backend


def fresh(i: int):
    """Images no other test uses, so the server's caches start cold for them."""
    return make_image((30 + 11 * i, 220 - 9 * i, 60 + 5 * i), size=(112, 112))


def counters(endpoint) -> tuple[int, int, int]:
    """(images uploaded, images encoded, decode tokens) on the server so far."""
    info = endpoint.server_info()
    engine = info["engine"]
    return (info["epd"]["images_uploaded"], engine.get("stats_images_encoded", 0),
            engine.get("stats_decode_tokens", 0))


def load_program(name: str):
    if str(PROGRAMS) not in sys.path:
        sys.path.insert(0, str(PROGRAMS))  # the programs import their `_common`
    spec = importlib.util.spec_from_file_location(f"program_{name}", PROGRAMS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same(a, b, where: str = "result") -> None:
    """Equal, except floats within 1e-4 and run-specific meta ignored."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a.keys() - RUN_SPECIFIC:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-4), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", PROGRAM_NAMES)
def test_backends_agree_on_every_program(name, rt, endpoint):
    main = load_program(name).main
    assert_same(main(rt), main(endpoint), name)


@epd.function
def turns(s, a, b):
    s += epd.system("You compare pictures.")
    s += epd.user(epd.image(a) + "Describe it.")
    s += epd.assistant(epd.gen("one", max_tokens=4))
    if s["one"] is not None:  # data-dependent: the trace stops, so `b` goes up when its statement runs
        s += epd.user("And this one? " + epd.image(b))
        s += epd.assistant(epd.gen("two", max_tokens=4))
    for turn in range(2):
        s += epd.user(epd.image(a) + epd.image(b) + f"Again, turn {turn}.")
        s += epd.assistant(epd.gen(f"again{turn}", max_tokens=4))


@epd.function
def unjoined(s, img):
    s += epd.user(epd.image(img) + "Look.")
    forks = s.fork(2)
    forks[0] += epd.assistant(epd.select("pick", choices=["red", "blue"]))
    forks[1] += epd.assistant(epd.gen("say", max_tokens=3, temperature=0))
    forks[1] += epd.user("More.")
    forks[1] += epd.assistant(epd.gen("more", max_tokens=2, temperature=0))
    return forks  # never joined: run() must still finish every branch (as SGLang does)


@pytest.mark.parametrize("backend", ["rt", "endpoint"])
def test_unjoined_fork_branches_run_before_run_returns(backend, request):
    state = unjoined.run(fresh(8), backend=request.getfixturevalue(backend))
    forks = state.ret_value
    assert isinstance(forks, epd.ForkGroup) and len(forks) == 2
    # read without syncing: the branches' variables are already there when run() has returned
    assert forks[0].variables["pick"] in ("red", "blue")
    assert forks[1].variables.keys() >= {"say", "more"}
    assert forks[1].meta["more"]["completion_tokens"] == 2
    assert "pick" not in state.variables  # nothing was joined back into the parent


@pytest.mark.parametrize("backend", ["rt", "endpoint"])
def test_ret_value_is_what_the_function_returned(backend, request):
    @epd.function
    def answer(s, img):
        s += epd.user(epd.image(img) + "Name a color.")
        s += epd.assistant(epd.gen("color", max_tokens=2, temperature=0))
        return {"color": s["color"], "n": 7}

    state = answer.run(fresh(9), backend=request.getfixturevalue(backend))
    assert state.ret_value == {"color": state["color"], "n": 7}


def test_each_image_uploaded_and_encoded_once_per_program(endpoint):
    uploads, encoded, _ = counters(endpoint)
    state = turns.run(fresh(1), fresh(2), backend=endpoint)
    after = counters(endpoint)
    assert (after[0] - uploads, after[1] - encoded) == (2, 2)
    for prev, name in (("one", "two"), ("two", "again0"), ("again0", "again1")):  # turns reuse the KV before
        assert state.get_meta_info(name)["cached_tokens"] >= state.get_meta_info(prev)["prompt_tokens"] - 16


@epd.function
def choose(s, img):
    s += epd.user(epd.image(img) + "Which word fits best?")
    s += epd.assistant(epd.select("word", choices=["red", "blue sky", "a green tree", "no"]))


def test_select_scores_like_the_runtime(rt, endpoint):
    img = fresh(3)
    _, _, decodes = counters(endpoint)
    remote, local = choose.run(img, backend=endpoint), choose.run(img, backend=rt)
    assert counters(endpoint)[2] == decodes  # prefill-only: no decode slot on the server either
    assert remote["word"] == local["word"]
    got, want = (st.get_meta_info("word")["normalized_prompt_logprobs"] for st in (remote, local))
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("optimize", [True, False], ids=["at-encode-ahead", "at-generate"])
def test_forgotten_image_id_is_uploaded_again(endpoint, optimize):
    img = fresh(4 if optimize else 7)
    key = epd.image(img).key
    endpoint._known[key] = Uploaded(key, "epd-image:" + "0" * 64, 16)  # as if the server had evicted it
    uploads, _, _ = counters(endpoint)
    state = choose.run(img, backend=endpoint, optimize=optimize)
    assert state["word"] and counters(endpoint)[0] - uploads == 1
    assert endpoint._known[key].id != "epd-image:" + "0" * 64


def error_of(resp: httpx.Response, status: int = 400) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_protocol_errors(server):
    unknown = "epd-image:" + "ab" * 32
    with server.client() as http:
        err = error_of(http.post("/generate", json={"text": "<|vision_start|><|image_pad|><|vision_end|>Hi",
                                                    "image_data": [unknown]}))
        assert err["code"] == "unknown_image" and unknown in err["message"]
        chat = {"model": server.model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": unknown}}, {"type": "text", "text": "Hi"}]}]}
        assert error_of(http.post("/v1/chat/completions", json=chat))["code"] == "unknown_image"
        for body in ({}, {"images": []}, {"images": "x"}, {"images": [1]}, {"images": [data_url()], "x": 1}):
            error_of(http.post("/epd/images", json=body))
        assert "base64" in error_of(http.post("/epd/images", json={"images": ["data:image/png;base64,@@"]}))["message"]
        error_of(http.post("/epd/images", json={"images": [data_url()] * 5}))  # over --max-images 4
        error_of(http.post("/epd/end_session", json={}))
        assert http.post("/epd/end_session", json={"session_id": "s1"}).json()["ended"] is True


def test_uploaded_id_works_in_generate_and_chat(server):
    with server.client() as http:
        up = http.post("/epd/images", json={"images": [data_url(fresh(5))]}).json()["images"][0]
        assert up["id"].startswith("epd-image:") and up["num_tokens"] > 0
        gen = http.post("/generate", json={"text": "<|vision_start|><|image_pad|><|vision_end|>Hi",
                                           "image_data": [up["id"]], "sampling_params": {"max_new_tokens": 2}})
        assert gen.status_code == 200 and gen.json()["meta_info"]["prompt_tokens"] > up["num_tokens"]
        chat = {"model": server.model, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": up["id"]}}, {"type": "text", "text": "Hi"}]}]}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_endpoint_checks_the_server(server):
    with pytest.raises(epd.InvalidRequest, match="401"):
        epd.RuntimeEndpoint(server.url, api_key="wrong")
    with pytest.raises(epd.EpdError, match="failed"):
        epd.RuntimeEndpoint("http://127.0.0.1:9")


def test_program_cli_uses_the_endpoint_for_an_epdlang_server(server):
    out = subprocess.run([sys.executable, str(PROGRAMS / "image_qa.py"), "--url", f"{server.url}/v1",
                          "--api-key", server.api_key], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RuntimeWarning" not in out.stderr  # not the degraded epd.OpenAI
    assert ast.literal_eval(out.stdout.strip().splitlines()[-1])["answer"]


def test_runtime_requests_carry_the_session_until_the_program_ends(rt):
    router, ended = rt.deployment.router, []
    end_session = rt.deployment.end_session
    rt.deployment.end_session = lambda sid: (ended.append((sid, sid in router.sessions)), end_session(sid))
    try:
        state = choose.run(fresh(6), backend=rt)
    finally:
        del rt.deployment.end_session
    assert ended == [(state.session_id, True)]  # the router had pinned it, and the program's end released it
    deadline = time.monotonic() + 5
    while state.session_id in router.sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.session_id not in router.sessions

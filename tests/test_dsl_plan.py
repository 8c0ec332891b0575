"""DSL without a model: import hygiene, stage plans, eager fallback and program errors."""
from __future__ import annotations

import subprocess
import sys

import pytest

import epdlang as epd
from images import make_image


def test_import_does_not_import_torch():
    code = ("import sys, epdlang as epd; epd.Runtime; epd.OpenAI; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@epd.function
def three_images(s, a, b, c):
    s += epd.system("Compare carefully.")
    s += epd.user(epd.image(a) + epd.image(b) + epd.image(c) + "What differs?")
    s += epd.assistant(epd.gen("diff", max_tokens=8))
    s += epd.user("And the first again:" + epd.image(a))
    s += epd.assistant(epd.gen("again", max_tokens=8))


def test_three_images_encode_first():
    plan = three_images.trace(*(make_image(c) for c in ("red", "green", "blue")))
    assert plan.kinds()[:3] == ["Encode"] * 3
    assert plan.kinds()[3:] == ["Prefill", "Decode", "Prefill", "Decode"]
    assert len(plan.images) == 3 and plan.stopped is None
    assert all(not n.deps for n in plan.nodes[:3])
    text = plan.explain()
    assert "Encode" in text and 'gen "again"' in text and "reuses this program's KV" in text


@epd.function
def yes_no(s, img):
    s += epd.user(epd.image(img) + "Is it red?")
    s += epd.assistant(epd.select("answer", choices=["yes", "no"]))


def test_select_is_score_without_decode():
    plan = yes_no.compile(make_image("red"))
    assert plan.kinds() == ["Encode", "Score"]
    assert "prefill-only" in plan.explain()


@epd.function
def branches(s):
    s += epd.user("Describe a cat.")
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += epd.assistant(epd.gen(f"d{i}", max_tokens=4))
    forks.join()


def test_fork_plan_has_one_shared_prefill():
    plan = branches.trace()
    shared = [n for n in plan.nodes if "shared prefix of 3 branches" in n.label]
    assert len(shared) == 1
    decodes = [n for n in plan.nodes if n.kind == "Decode"]
    assert {n.branch for n in decodes} == {"main/0", "main/1", "main/2"}


@epd.function
def data_dependent(s):
    s += epd.user("Say yes or no.")
    s += epd.assistant(epd.gen("a", max_tokens=4))
    s += epd.user("You said: " + s["a"])  # traceable: only concatenated
    if s["a"].strip() == "yes":  # not traceable
        s += epd.assistant(epd.gen("b"))


def test_eager_fallback_named():
    plan = data_dependent.trace()
    assert plan.kinds() == ["Prefill", "Decode"]
    assert 'if s["a"].strip() == "yes"' in plan.stopped
    assert "eager from" in plan.explain()


def test_gen_without_name_names_statement():
    @epd.function
    def bad(s):
        s += epd.assistant(epd.gen(max_tokens=4))

    with pytest.raises(epd.ProgramError, match=r"needs a variable name.*epd\.gen\(max_tokens=4\)"):
        bad.trace()


def test_unknown_image_type_names_statement():
    @epd.function
    def bad(s):
        s += epd.user(epd.image(12345) + "what?")

    with pytest.raises(epd.ProgramError, match=r"unknown image type int.*epd\.image\(12345\)"):
        bad.trace()


def test_invalid_regex_names_statement():
    @epd.function
    def bad(s):
        s += epd.assistant(epd.gen("x", regex="([a-z"))

    with pytest.raises(epd.ProgramError, match=r"invalid regex.*regex=\"\(\[a-z\"\)"):
        bad.trace()


def test_bad_sampling_and_select():
    with pytest.raises(epd.ProgramError, match="unknown sampling arguments.*temprature"):
        epd.gen("x", temprature=0.5)
    with pytest.raises(epd.ProgramError, match="max_new_tokens must be >= 0"):
        epd.gen("x", max_tokens=-1)
    with pytest.raises(epd.ProgramError, match="choices"):
        epd.select("x", choices=[])
    assert epd.gen("x", max_tokens=5).sampling == {"max_new_tokens": 5}
    assert epd.gen("x", choices=["a", "b"]).choices == ("a", "b")


def test_no_backend_is_clear():
    epd.set_default_backend(None)
    with pytest.raises(epd.ProgramError, match="no backend"):
        yes_no.run(make_image("red"))


def test_bind():
    plan = three_images.bind(a=make_image("red"), b=make_image("red"), c=make_image("blue")).trace()
    assert plan.kinds()[:2] == ["Encode", "Encode"] and len(plan.images) == 2  # equal images: one Encode

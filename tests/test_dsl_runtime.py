"""DSL on the real in-process runtime: counters prove the compiler passes; select matches transformers."""
from __future__ import annotations

import asyncio

import pytest
import torch

import epdlang as epd
from images import make_image
from reference import reference_inputs
from runtime.preprocess import PreparedPrompt

PAGE = 16


@pytest.fixture(scope="module")
def rt(tiny_model_dir):
    with epd.Runtime(model=tiny_model_dir, page_size=PAGE, kv_cache_bytes=64 << 20) as runtime:
        yield runtime


def fresh(i: int):
    """Images no other test uses, so the engine's encoder cache starts cold for them."""
    return make_image((40 + 7 * i, 200 - 5 * i, 90 + 3 * i), size=(112, 112))


@epd.function
def multi_turn(s, a, b):
    s += epd.user(epd.image(a) + epd.image(b) + "Describe both.")
    s += epd.assistant(epd.gen("one", max_tokens=4))
    s += epd.user("Look at the first again: " + epd.image(a))
    s += epd.assistant(epd.gen("two", max_tokens=4))
    s += epd.user("And the second: " + epd.image(b))
    s += epd.assistant(epd.gen("three", max_tokens=4))


def test_each_image_encoded_once_and_turns_reuse_kv(rt):
    before = rt.stats()["images_encoded"]
    state = multi_turn.run(fresh(1), fresh(2), backend=rt)
    assert rt.stats()["images_encoded"] - before == 2
    for prev, name in (("one", "two"), ("two", "three")):  # each turn reuses at least the previous prompt
        meta, earlier = state.get_meta_info(name), state.get_meta_info(prev)
        assert meta["cached_tokens"] >= earlier["prompt_tokens"] - PAGE, (earlier, meta)


@epd.function
def forked(s, img):
    s += epd.system("You describe images. " * 8)
    s += epd.user(epd.image(img) + "Describe it.")
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += epd.assistant(epd.gen(f"d{i}", max_tokens=4, temperature=0.0))
    forks.join()


def test_fork_branches_share_prefix(rt):
    state = forked.run(fresh(3), backend=rt)
    shared = state.get_meta_info("__fork_prefill__")["prompt_tokens"]
    assert len(state["d0"]) == 3
    metas = [state.get_meta_info(f"d{i}")["branches"][i] for i in range(3)]
    for meta in metas:
        assert meta["cached_tokens"] >= shared - PAGE, (shared, meta)


@epd.function
def batch_item(s, img, question):
    s += epd.system("You are a careful visual inspector. Answer briefly. " * 6)
    s += epd.user(epd.image(img) + question)
    s += epd.assistant(epd.gen("answer", max_tokens=4))


def test_run_batch_items_share_common_prefix(rt):
    img = fresh(4)
    items = [{"img": img, "question": q} for q in ("What color?", "What shape?", "How many?", "Where?")]
    before = rt.stats()["images_encoded"]
    states = batch_item.run_batch(items, backend=rt, progress_bar=True)
    assert rt.stats()["images_encoded"] - before == 1
    metas = [s.get_meta_info("answer") for s in states]
    common = min(m["prompt_tokens"] for m in metas) - 8  # the questions differ only at the end
    for meta in metas:
        assert meta["cached_tokens"] >= common - PAGE, meta


@epd.function
def choose(s, img):
    s += epd.user(epd.image(img) + "Which word fits best?")
    s += epd.assistant(epd.select("word", choices=["red", "blue sky", "a green tree", "no"]))


@torch.inference_mode()
def test_select_matches_transformers(rt, processor, hf_model):
    img = fresh(5)
    decodes = rt.stats()["decode_tokens"]
    state = choose.run(img, backend=rt)
    assert rt.stats()["decode_tokens"] == decodes  # prefill-only: no decode slot
    meta = state.get_meta_info("word")
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which word fits best?<|im_end|>\n"
            "<|im_start|>assistant\n")
    prefix = processor.prepare(prompt=text, images=[img])
    expected = []
    for choice in ["red", "blue sky", "a green tree", "no"]:
        ids = processor.tokenizer(choice, add_special_tokens=False)["input_ids"]
        full = PreparedPrompt(prefix.input_ids + tuple(ids), prefix.images)
        logits = hf_model(**reference_inputs(processor, full)).logits[0].float()
        lps = torch.log_softmax(logits, -1)
        n = len(prefix.input_ids)
        expected.append(sum(lps[n + j - 1, t].item() for j, t in enumerate(ids)) / len(ids))
    assert meta["normalized_prompt_logprobs"] == pytest.approx(expected, abs=2e-3)
    best = max(range(4), key=lambda i: expected[i])
    assert state["word"] == ["red", "blue sky", "a green tree", "no"][best]


def test_template_matches_chat_template(rt, processor):
    img = fresh(6)

    @epd.function
    def convo(s):
        s += epd.system("Be brief.")
        s += epd.user(epd.image(img) + "Hi")
        s += epd.assistant("Hello")
        s += epd.user("Bye")

    ours = convo.run(backend=rt).text()
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    theirs, _ = processor.render_messages(messages, add_generation_prompt=False)
    assert ours == theirs

    @epd.function
    def no_system(s):  # the template's default system turn, as the chat template adds it
        s += epd.user(epd.image(img) + "Hi")

    theirs, _ = processor.render_messages(messages[1:2], add_generation_prompt=False)
    assert no_system.run(backend=rt).text() == theirs


def test_streaming_sync_and_async(rt):
    state = batch_item.run(img=fresh(7), question="Color?", backend=rt, stream=True)
    streamed = "".join(state.text_iter("answer"))
    assert streamed == state["answer"] and streamed

    async def collect():
        s2 = batch_item.run(img=fresh(7), question="Color?", backend=rt, stream=True)
        return [chunk async for chunk in s2.text_async_iter("answer")], s2

    chunks, s2 = asyncio.run(collect())
    assert "".join(chunks) == s2["answer"] == state["answer"]  # greedy: same answer


def test_json_schema_and_runtime_errors(rt):
    schema = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 8}},
              "required": ["color"], "additionalProperties": False}  # compact JSON is the default

    @epd.function
    def extract(s):
        s += epd.user("Give JSON.")
        s += epd.assistant(epd.gen("obj", json_schema=schema, max_tokens=40))

    import json

    text = extract.run(backend=rt)["obj"]
    value = json.loads(text)
    assert set(value) == {"color"} and text == json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    @epd.function
    def missing_file(s):
        s += epd.user(epd.image("/nonexistent/cat.png") + "what?")
        s += epd.assistant(epd.gen("x", max_tokens=2))

    with pytest.raises(epd.ImageError) as err:
        missing_file.run(backend=rt)
    assert "cannot read image file" in str(err.value)
    assert any('epd.image("/nonexistent/cat.png")' in n for n in err.value.__notes__), err.value.__notes__

"""The offline tiny checkpoint: loads with transformers, is deterministic, and gives varied greedy output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from images import make_image
from reference import reference_greedy
from runtime import tiny_model
from runtime.cli import main as cli_main
from runtime.tiny_model import SPECIAL_TOKENS, ensure_tiny_model

EXPECTED_FILES = {
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
}


def _file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_files_present(tiny_model_dir: Path):
    assert EXPECTED_FILES <= {p.name for p in tiny_model_dir.iterdir()}


def test_cli_build_is_byte_identical_to_cached(tiny_model_dir: Path, tmp_path: Path):
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--size", "tiny", "--seed", "0"]) == 0
    built, cached = _file_bytes(tmp_path / "m"), _file_bytes(tiny_model_dir)
    assert sorted(built) == sorted(cached)
    assert [n for n in built if built[n] != cached[n]] == []  # names the differing files, not their bytes


def test_loads_offline_with_transformers(tiny_model_dir: Path, hf_model):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    ip = AutoImageProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(ip).__name__.startswith("Qwen2VLImageProcessor")
    _, info = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    n_params = sum(p.numel() for p in hf_model.parameters())
    assert 8_000_000 < n_params < 16_000_000
    emb, head = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
    assert not hf_model.config.tie_word_embeddings and not (emb == head).all()


def test_special_token_ids_match_config(tiny_model_dir: Path, processor):
    tok = processor.tokenizer
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert tok.convert_ids_to_tokens(list(ids.values())) == list(SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(ids["<|endoftext|>"], ids["<|endoftext|>"] + len(SPECIAL_TOKENS)))
    assert cfg["image_token_id"] == ids["<|image_pad|>"]
    assert cfg["video_token_id"] == ids["<|video_pad|>"]
    assert cfg["vision_start_token_id"] == ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == ids["<|vision_end|>"]
    assert cfg["text_config"]["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert cfg["text_config"]["pad_token_id"] == ids["<|endoftext|>"] == tok.pad_token_id
    assert processor.eos_token_ids == (ids["<|im_end|>"], ids["<|endoftext|>"])
    assert len(tok) <= cfg["text_config"]["vocab_size"]
    # specials are atomic when they appear in text
    assert tok("a<|image_pad|>b", add_special_tokens=False)["input_ids"].count(ids["<|image_pad|>"]) == 1


def test_tokenizer_round_trips_text(processor):
    text = "def f(x):\n    return x + 1  # ünïcode ✓"
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == text


def test_chat_template(processor):
    tok = processor.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "A:"}, {"type": "image"},
                                     {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "ok"},
    ]
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA:{vision}{vision}?<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n")


def test_image_changes_greedy_output(processor, hf_model):
    def run(color: str) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image", "image": make_image(color)},
                                                 {"type": "text", "text": "Describe the image."}]}]
        return reference_greedy(hf_model, processor, processor.prepare(messages), max_new_tokens=8)

    red, blue = run("red"), run("blue")
    assert len(red) == len(blue) == 8
    assert red != blue


def test_text_greedy_output_is_varied(processor, hf_model):
    prepared = processor.prepare([{"role": "user", "content": "Tell me a story about a cat."}])
    tokens = reference_greedy(hf_model, processor, prepared, max_new_tokens=16)
    assert len(tokens) == 16
    assert len(set(tokens)) > 4


def test_ensure_tiny_model_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_build(out_dir, size="tiny", seed=0, arch="qwen2_vl"):
        calls.append((size, seed))
        (Path(out_dir) / "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build_tiny_model", fake_build)
    first = ensure_tiny_model("tiny", seed=3)
    assert first == tmp_path / "models" / "tiny-seed3-v1" and (first / "config.json").is_file()
    assert ensure_tiny_model("tiny", seed=3) == first
    assert calls == [("tiny", 3)]
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left behind


def test_ensure_tiny_model_loses_race_gracefully(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    final = tmp_path / "models" / "tiny-seed0-v1"

    def racing_build(out_dir, size="tiny", seed=0, arch="qwen2_vl"):
        (Path(out_dir) / "config.json").write_text("{}")
        final.mkdir()  # another process finished first, with the same builder
        (final / "config.json").write_text('{"winner": true}')
        (final / tiny_model.STAMP_FILE).write_text(tiny_model.build_stamp())

    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build_tiny_model", racing_build)
    assert ensure_tiny_model("tiny", seed=0) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_stale_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cached dir from another builder or library version (no stamp, or another one) is replaced."""
    final = tmp_path / "models" / "tiny-seed0-v1"
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"stale": true}')

    def build(out_dir, size="tiny", seed=0, arch="qwen2_vl"):
        (Path(out_dir) / "config.json").write_text('{"fresh": true}')

    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny_model, "build_tiny_model", build)
    for old_stamp in (None, "another-builder"):
        if old_stamp:
            (final / "config.json").write_text('{"stale": true}')
            (final / tiny_model.STAMP_FILE).write_text(old_stamp)
        assert ensure_tiny_model("tiny", seed=0) == final
        assert json.loads((final / "config.json").read_text()) == {"fresh": True}
        assert (final / tiny_model.STAMP_FILE).read_text() == tiny_model.build_stamp()
        assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_serve_aliases_resolve_to_checkpoints():
    from runtime.tiny_model import SHAPES_CHECKPOINT, resolve_model

    assert resolve_model("tiny") == resolve_model("shapes") == str(SHAPES_CHECKPOINT)  # the trained default
    assert resolve_model("tiny-random") == str(ensure_tiny_model("tiny"))
    assert resolve_model("/some/dir") == "/some/dir"

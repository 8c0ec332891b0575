"""Our LLaVA-1.5 (CLIP ViT + projector + Llama) against transformers on the same random checkpoint (fp32, atol 1e-4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_utils import PagedSequences, Step, new_pool, shuffled_pages, text_ids
from runtime.models import load_model, read_config
from runtime.models.config import model_config_from_hf
from runtime.models.qwen2_vl import Qwen2VLForConditionalGeneration

transformers = pytest.importorskip("transformers")

VOCAB, IMG, EOS = 300, 290, 1
SIDE, PATCH = 56, 14
GRID = (1, SIDE // PATCH, SIDE // PATCH)
TOKENS = (SIDE // PATCH) ** 2  # per image with the "default" strategy (CLS dropped)
ATOL = 1e-4

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=SIDE,
              patch_size=PATCH, initializer_range=0.1)
TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1, bos_token_id=0,
            eos_token_id=EOS)


def llava_config(text=None, **kw):
    kw = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **kw}
    return transformers.LlavaConfig(vision_config=VISION, text_config={**TEXT, **(text or {})}, image_token_id=IMG,
                                    **kw)


def save_checkpoint(config, path: Path):
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory):
    """(checkpoint dir, the transformers model saved there)."""
    path = tmp_path_factory.mktemp("llava")
    return path, save_checkpoint(llava_config(), path)


@pytest.fixture(scope="module")
def llava(llava_checkpoint):
    path, hf = llava_checkpoint
    return hf, load_model(path)


def image_prompt(n_images: int, seed: int, tokens: int = TOKENS) -> list[int]:
    ids = text_ids(5, seed)
    for i in range(n_images):
        ids += [IMG] * tokens + text_ids(3 + i, seed + 1 + i)
    return ids


def pixels_for(n_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def grids(n_images: int) -> torch.Tensor:
    return torch.tensor([GRID] * n_images)


@torch.no_grad()
def hf_logits(hf, ids: list[int], pixels=None) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]






def prefill_all(model, ids, pixels=None, page_size=1, num_pages=256):
    """Our logits at every position of one prompt."""
    kv = new_pool(model, num_pages, page_size)
    n = 0 if pixels is None else pixels.shape[0]
    pos, delta = model.rope_positions(ids, [GRID] * n)
    assert delta == 0
    embeds = torch.cat(model.encode(pixels, grids(n))) if n else None
    batch = PagedSequences(kv).build([Step(0, ids, pos)], image_embeds=embeds, all_logits=True)
    return model.prefill(batch, kv)


def test_config(llava_checkpoint):
    c = read_config(llava_checkpoint[0])
    assert c.architecture == "LlavaForConditionalGeneration" and c.rope_kind == "default"
    assert (c.tokens_per_image, c.patch_size, c.image_token_id, c.eos_token_ids) == (TOKENS, PATCH, IMG, (EOS,))
    assert (c.video_token_id, c.vision_start_token_id, c.spatial_merge_size) == (-1, -1, 1)
    assert c.text.mrope_section == (16, 0, 0) and not (c.text.qkv_bias or c.text.o_bias or c.text.mlp_bias)
    assert c.vision.feature_layers == (-2,) and c.vision.image_size == SIDE


def test_config_rejects_rope_scaling(llava_checkpoint):
    raw = json.loads((llava_checkpoint[0] / "config.json").read_text())
    raw["text_config"]["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(NotImplementedError, match="linear"):
        model_config_from_hf(raw, torch.float32)


# llava-hf/llava-1.5-7b-hf's config.json: most fields are left to transformers' defaults
LLAVA_1_5_7B = {
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000, "model_type": "llava",
    "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_sparse_config_takes_transformers_defaults():
    c = model_config_from_hf(LLAVA_1_5_7B, torch.float16, extra_eos=(2,))
    ref = transformers.LlavaConfig(**{k: v for k, v in LLAVA_1_5_7B.items() if k != "vocab_size"})
    t, v = ref.text_config, ref.vision_config
    assert (c.num_layers, c.hidden_size, c.text.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        t.num_hidden_layers, t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
        t.head_dim)
    assert (c.vocab_size, c.text.rms_norm_eps, c.text.rope_theta, c.text.hidden_act) == (
        t.vocab_size, t.rms_norm_eps, t.rope_parameters["rope_theta"], t.hidden_act)
    assert (c.vision.num_layers, c.vision.hidden_size, c.vision.layer_norm_eps, c.vision.hidden_act) == (
        v.num_hidden_layers, v.hidden_size, v.layer_norm_eps, v.hidden_act)
    assert (c.image_token_id, c.tokens_per_image, c.eos_token_ids) == (ref.image_token_id, 576, (2,))
    assert not c.text.tie_word_embeddings and c.dtype == torch.float16


@pytest.mark.parametrize("n_images", [1, 2])
def test_vision_encode_matches(llava, n_images):
    hf, ours = llava
    pixels = pixels_for(n_images, n_images)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
    out = ours.encode(pixels, grids(n_images))
    assert [o.shape for o in out] == [(TOKENS, 128)] * n_images
    torch.testing.assert_close(torch.stack(out), torch.stack(list(ref)), atol=ATOL, rtol=0)


def test_encode_rejects_wrong_sizes(llava):
    _, ours = llava
    with pytest.raises(ValueError, match="pixel_values"):
        ours.encode(torch.zeros(1, 3, SIDE, SIDE + PATCH), torch.tensor([[1, 4, 5]]))
    with pytest.raises(ValueError, match="grid_thw"):
        ours.encode(pixels_for(2), grids(1))


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_prefill_matches(llava, n_images):
    hf, ours = llava
    ids = image_prompt(n_images, 10 + n_images) if n_images else text_ids(40, 1)
    pixels = pixels_for(n_images, 20 + n_images) if n_images else None
    torch.testing.assert_close(prefill_all(ours, ids, pixels), hf_logits(hf, ids, pixels), atol=ATOL, rtol=0)


def test_rope_positions(llava):
    _, ours = llava
    ids = image_prompt(2, 3)
    pos, delta = ours.rope_positions(ids, [GRID, GRID])
    assert pos.shape == (3, len(ids)) and delta == 0
    assert torch.equal(pos, torch.arange(len(ids)).expand(3, -1))
    with pytest.raises(ValueError):
        ours.rope_positions(ids, [GRID])
    with pytest.raises(ValueError):
        ours.rope_positions(image_prompt(1, 3), [GRID, GRID])


@pytest.mark.parametrize("page_size", [1, 16])
def test_chunked_prefill_matches(llava, page_size):
    """Chunks cut inside both images' token runs (rows 5-20 and 24-39)."""
    hf, ours = llava
    ids, pixels = image_prompt(2, 30), pixels_for(2, 31)
    ref = hf_logits(hf, ids, pixels)
    embeds = torch.cat(ours.encode(pixels, grids(2)))
    pos, _ = ours.rope_positions(ids, [GRID] * 2)
    kv = new_pool(ours, 128 // page_size, page_size)
    seqs = PagedSequences(kv, shuffled_pages(128 // page_size, seed=page_size))
    cuts, used = [0, 10, 30, len(ids)], 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        n_img = sum(t == IMG for t in ids[a:b])
        chunk_embeds = embeds[used:used + n_img] if n_img else None
        used += n_img
        logits = ours.prefill(seqs.build([Step(0, ids[a:b], pos[:, a:b])], image_embeds=chunk_embeds,
                                         all_logits=True), kv)
        torch.testing.assert_close(logits, ref[a:b], atol=ATOL, rtol=0)


@pytest.mark.parametrize("page_size, backend", [(1, "sdpa"), (16, "sdpa"), (16, "sdpa_padded")])
def test_ragged_prefill_then_batched_decode(llava_checkpoint, page_size, backend):
    path, hf = llava_checkpoint
    ours = load_model(path, attn_backend=backend)
    n_images = [0, 1, 2]
    prompts = [text_ids(7, 40), image_prompt(1, 41), image_prompt(2, 42)]
    pixels = [pixels_for(n, 50 + n) if n else None for n in n_images]
    embeds = torch.cat([torch.cat(ours.encode(p, grids(len(p)))) for p in pixels if p is not None])
    kv = new_pool(ours, 256 // page_size, page_size)
    seqs = PagedSequences(kv, shuffled_pages(256 // page_size, seed=page_size))
    steps = [Step(i, p, ours.rope_positions(p, [GRID] * n)[0]) for i, (p, n) in enumerate(zip(prompts, n_images))]
    logits = ours.prefill(seqs.build(steps, image_embeds=embeds), kv)
    seqs_ids = [list(p) for p in prompts]
    for step in range(5):  # the prefill's logits, then 4 batched greedy decode steps
        if step:
            steps = [Step(i, [ids[-1]], torch.full((3, 1), len(ids) - 1)) for i, ids in enumerate(seqs_ids)]
            logits = ours.decode(seqs.build(steps, is_decode=True), kv)
        for i, ids in enumerate(seqs_ids):
            ref = hf_logits(hf, ids, pixels[i])[-1]
            torch.testing.assert_close(logits[i], ref, atol=ATOL, rtol=0, msg=f"seq {i} step {step}")
            ids.append(int(logits[i].argmax()))
    for prompt, ids, px in zip(prompts, seqs_ids, pixels):
        kw = {} if px is None else {"pixel_values": px}
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=5, do_sample=False, **kw)
        assert out[0, len(prompt):].tolist() == ids[len(prompt):]


def test_partial_loads(llava_checkpoint, llava):
    path, ours = llava_checkpoint[0], llava[1]
    encoder = load_model(path, load_lm=False)
    lm = load_model(path, load_vision=False)
    assert encoder.lm is None and not any(n.startswith("lm.") for n, _ in encoder.named_parameters())
    assert {n.split(".")[1] for n, _ in encoder.named_parameters()} == {"vision_tower", "multi_modal_projector"}
    assert lm.visual is None and not any(n.startswith("visual.") for n, _ in lm.named_parameters())
    pixels = pixels_for(1, 60)
    torch.testing.assert_close(encoder.encode(pixels, grids(1))[0], ours.encode(pixels, grids(1))[0], atol=0, rtol=0)
    with pytest.raises(RuntimeError):
        encoder.prefill(None, None)
    with pytest.raises(RuntimeError):
        lm.encode(pixels, grids(1))
    ids = text_ids(12, 61)
    torch.testing.assert_close(prefill_all(lm, ids), prefill_all(ours, ids), atol=0, rtol=0)


LAYOUTS = {  # saved name prefix -> the layout's prefix (transformers 5.24 saves `vision_tower.*`, no `vision_model.`)
    "llava-hf": {"vision_tower.": "vision_tower.vision_model."},
    "transformers5": {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                      "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."},
}


def rewrite_sharded(src: Path, dst: Path, renames: dict[str, str]) -> None:
    """The checkpoint at `src` under other key names, in two shards with an index."""
    def rename(key: str) -> str:
        old = next((p for p in renames if key.startswith(p)), None)
        return key if old is None else renames[old] + key[len(old):]

    weights = {rename(k): v for k, v in load_file(src / "model.safetensors").items()}
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: weights[k].contiguous() for k in shard_keys}, dst / name)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_other_key_layouts_load(llava_checkpoint, tmp_path, layout):
    src, hf = llava_checkpoint
    rewrite_sharded(src, tmp_path, LAYOUTS[layout])
    assert any(k.startswith(("vision_tower.vision_model.", "model.vision_tower."))
               for k in json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    reread = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in reread.state_dict().items())  # a layout HF reads
    ids, pixels = image_prompt(1, 70), pixels_for(1, 71)
    torch.testing.assert_close(prefill_all(load_model(tmp_path), ids, pixels), hf_logits(hf, ids, pixels),
                               atol=ATOL, rtol=0)


def test_variant_flags_match(tmp_path):
    """Two concatenated feature layers, the "full" strategy (CLS kept), no projector bias, Llama
    attention/MLP biases and tied embeddings."""
    config = llava_config(text={"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
                          vision_feature_layer=[-3, -1], vision_feature_select_strategy="full",
                          multimodal_projector_bias=False, tie_word_embeddings=True)
    hf = save_checkpoint(config, tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.tokens_per_image == TOKENS + 1 and ours.config.text.tie_word_embeddings
    assert ours.config.text.qkv_bias and ours.config.text.o_bias and ours.config.text.mlp_bias
    pixels = pixels_for(2, 80)
    with torch.no_grad():
        ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.stack(ours.encode(pixels, grids(2))), torch.stack(list(ref)), atol=ATOL, rtol=0)
    ids = image_prompt(2, 81, tokens=TOKENS + 1)
    torch.testing.assert_close(prefill_all(ours, ids, pixels), hf_logits(hf, ids, pixels), atol=ATOL, rtol=0)


def test_missing_weight_is_an_error(llava_checkpoint, tmp_path):
    src = llava_checkpoint[0]
    weights = load_file(src / "model.safetensors")
    del weights["language_model.model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.qkv_proj\.weight\[1\]"):
        load_model(tmp_path)
    load_model(tmp_path, load_lm=False)  # the vision side alone is complete
    del weights["multi_modal_projector.linear_2.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"multi_modal_projector\.linear_2\.bias"):
        load_model(tmp_path, load_lm=False)


def test_dummy_image(llava):
    _, ours = llava
    pixels, grid = ours.dummy_image(1000)  # the size is fixed whatever the request
    assert pixels.shape == (1, 3, SIDE, SIDE) and grid.tolist() == [list(GRID)]
    assert [o.shape for o in ours.encode(pixels, grid)] == [(TOKENS, 128)]


@pytest.mark.parametrize("tokens, side", [(1, 1), (64, 8), (100, 10), (130, 11)])
def test_qwen2_vl_dummy_image(tokens, side):
    vision = dict(depth=1, embed_dim=32, hidden_size=128, num_heads=2, mlp_ratio=2)
    raw = transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision).to_dict()
    model = Qwen2VLForConditionalGeneration(model_config_from_hf(raw, torch.float32), with_lm=False)
    pixels, grid = model.dummy_image(tokens)
    assert grid.tolist() == [[1, 2 * side, 2 * side]] and pixels.shape == (4 * side * side, 3 * 2 * 14 * 14)
    assert pixels.dtype == torch.float32 and not pixels.any()
    assert [o.shape[0] for o in model.encode(pixels, grid)] == [side * side]

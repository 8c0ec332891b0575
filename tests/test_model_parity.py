"""Our Qwen2-VL / Qwen2.5-VL against transformers on the same random checkpoint (fp32, atol 1e-4)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_utils import PagedSequences, Step, new_pool, shuffled_pages, text_ids
from runtime.models import load_model

transformers = pytest.importorskip("transformers")

VOCAB, IMG, VID, VSTART, VEND = 300, 290, 291, 288, 289
PATCH_DIM = 3 * 2 * 14 * 14
GRIDS = [(1, 16, 16), (1, 12, 20)]
ATOL = 1e-4

TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1, bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def qwen2_config():
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, initializer_range=0.1)
    return transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision, **IDS)


def qwen2_5_config():
    vision = dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=128,
                  window_size=112, fullatt_block_indexes=[1], initializer_range=0.1)
    text = {**TEXT, "tie_word_embeddings": True}
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **IDS)


def save_checkpoint(cls, config, path, dtype=torch.float32):
    torch.manual_seed(0)
    hf = cls(config).eval()
    if dtype == torch.float32:
        hf.save_pretrained(path)
        return hf
    hf.to(dtype).save_pretrained(path)  # this also rounds rope buffers: reload for a clean reference
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory):
    """(checkpoint dir, the transformers model saved there)."""
    path = tmp_path_factory.mktemp("qwen2vl")
    return path, save_checkpoint(transformers.Qwen2VLForConditionalGeneration, qwen2_config(), path)


@pytest.fixture(scope="module")
def qwen2(qwen2_checkpoint):
    path, hf = qwen2_checkpoint
    return hf, load_model(path)


def image_prompt(grids, seed: int) -> list[int]:
    ids = text_ids(5, seed)
    for i, (t, h, w) in enumerate(grids):
        ids += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + text_ids(3 + i, seed + 1 + i)
    return ids


def pixels_for(grids, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


@torch.no_grad()
def hf_logits(hf, ids: list[int], grids=(), pixels=None) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    kw = {}
    if grids:
        kw = dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                  mm_token_type_ids=(input_ids == IMG).int())
    return hf(input_ids=input_ids, **kw).logits[0]






def prefill_all(model, ids, grids=(), pixels=None, page_size=1, num_pages=512):
    """Our logits at every position of one prompt."""
    kv = new_pool(model, num_pages, page_size)
    seqs = PagedSequences(kv)
    pos, _ = model.rope_positions(ids, grids)
    embeds = torch.cat(model.encode(pixels, torch.tensor(grids))) if grids else None
    batch = seqs.build([Step(0, ids, pos)], image_embeds=embeds, all_logits=True)
    return model.prefill(batch, kv)


def test_text_prefill_matches(qwen2):
    hf, ours = qwen2
    ids = text_ids(40, 1)
    torch.testing.assert_close(prefill_all(ours, ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("page_size, backend", [(4, "sdpa"), (16, "sdpa"), (16, "sdpa_padded")])
def test_ragged_prefill_then_batched_decode(qwen2_checkpoint, page_size, backend):
    path, hf = qwen2_checkpoint
    ours = load_model(path, attn_backend=backend)
    prompts = [text_ids(7, 2), image_prompt(GRIDS[1:], 3), text_ids(23, 4)]
    pixels = pixels_for(GRIDS[1:], 5)
    embeds = torch.cat(ours.encode(pixels, torch.tensor(GRIDS[1:])))
    kv = new_pool(ours, 256 // page_size, page_size)
    seqs = PagedSequences(kv, shuffled_pages(256 // page_size, seed=page_size))
    rope = [ours.rope_positions(p, GRIDS[1:] if i == 1 else ()) for i, p in enumerate(prompts)]
    batch = seqs.build([Step(i, p, rope[i][0]) for i, p in enumerate(prompts)], image_embeds=embeds)
    logits = ours.prefill(batch, kv)
    seqs_ids = [list(p) for p in prompts]
    for step in range(6):  # the prefill's logits, then 5 batched greedy decode steps
        if step:
            steps = [Step(i, [ids[-1]], torch.full((3, 1), len(ids) - 1 + rope[i][1]))
                     for i, ids in enumerate(seqs_ids)]
            logits = ours.decode(seqs.build(steps, is_decode=True), kv)
        for i, ids in enumerate(seqs_ids):
            grids = GRIDS[1:] if i == 1 else ()
            ref = hf_logits(hf, ids, grids, pixels if grids else None)[-1]
            torch.testing.assert_close(logits[i], ref, atol=ATOL, rtol=0, msg=f"seq {i} step {step}")
            ids.append(int(logits[i].argmax()))


def test_mixed_prefill_batch(qwen2):
    """One sequence continues from cached KV while another starts fresh, in the same pass."""
    hf, ours = qwen2
    a, b = text_ids(50, 20), text_ids(15, 21)
    kv = new_pool(ours, 32, page_size=4)
    seqs = PagedSequences(kv, shuffled_pages(32, seed=3))
    ours.prefill(seqs.build([Step(0, a[:20], torch.arange(20).expand(3, -1))]), kv)
    batch = seqs.build([Step(0, a[20:], torch.arange(20, 50).expand(3, -1)),
                        Step(1, b, torch.arange(15).expand(3, -1))], all_logits=True)
    logits = ours.prefill(batch, kv)
    torch.testing.assert_close(logits[:30], hf_logits(hf, a)[20:], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[30:], hf_logits(hf, b), atol=ATOL, rtol=0)


def test_vision_encode_matches(qwen2):
    hf, ours = qwen2
    pixels = pixels_for(GRIDS)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
    out = ours.encode(pixels, torch.tensor(GRIDS))
    assert [o.shape[0] for o in out] == [64, 60]
    torch.testing.assert_close(torch.cat(out), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grids", [[], GRIDS[:1], GRIDS, [(1, 4, 6), (1, 8, 8), (1, 2, 2)]])
def test_rope_positions_match_get_rope_index(qwen2, grids):
    hf, ours = qwen2
    ids = image_prompt(grids, 7) if grids else text_ids(20, 7)
    input_ids = torch.tensor([ids])
    ref, ref_delta = hf.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == IMG).int(),
                                             image_grid_thw=torch.tensor(grids) if grids else None)
    pos, delta = ours.rope_positions(ids, grids)
    assert torch.equal(pos, ref[:, 0]) and delta == int(ref_delta)


def test_rope_positions_reject_grid_mismatch(qwen2):
    _, ours = qwen2
    with pytest.raises(ValueError):
        ours.rope_positions(image_prompt(GRIDS[:1], 0), GRIDS)
    with pytest.raises(ValueError):
        ours.rope_positions(image_prompt(GRIDS, 0), GRIDS[:1])


def test_two_image_prefill_matches(qwen2):
    hf, ours = qwen2
    ids, pixels = image_prompt(GRIDS, 8), pixels_for(GRIDS, 9)
    ref = hf_logits(hf, ids, GRIDS, pixels)
    torch.testing.assert_close(prefill_all(ours, ids, GRIDS, pixels), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("page_size", [1, 16])
def test_chunked_prefill_matches(qwen2, page_size):
    hf, ours = qwen2
    ids, pixels = image_prompt(GRIDS, 10), pixels_for(GRIDS, 11)
    ref = hf_logits(hf, ids, GRIDS, pixels)
    embeds = torch.cat(ours.encode(pixels, torch.tensor(GRIDS)))
    pos, _ = ours.rope_positions(ids, GRIDS)
    kv = new_pool(ours, 400 // page_size, page_size)
    seqs = PagedSequences(kv, shuffled_pages(400 // page_size))
    cuts, used = [0, 30, 100, len(ids)], 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        n_img = sum(t == IMG for t in ids[a:b])
        chunk_embeds = embeds[used:used + n_img] if n_img else None
        used += n_img
        logits = ours.prefill(seqs.build([Step(0, ids[a:b], pos[:, a:b])], image_embeds=chunk_embeds,
                                         all_logits=True), kv)
        torch.testing.assert_close(logits, ref[a:b], atol=ATOL, rtol=0)


def test_partial_loads(qwen2_checkpoint, qwen2):
    path, ours = qwen2_checkpoint[0], qwen2[1]
    encoder = load_model(path, load_lm=False)
    lm = load_model(path, load_vision=False)
    assert encoder.lm is None and not any(n.startswith("lm.") for n, _ in encoder.named_parameters())
    assert lm.visual is None and not any(n.startswith("visual.") for n, _ in lm.named_parameters())
    pixels = pixels_for(GRIDS[:1])
    torch.testing.assert_close(encoder.encode(pixels, torch.tensor(GRIDS[:1]))[0],
                               ours.encode(pixels, torch.tensor(GRIDS[:1]))[0], atol=0, rtol=0)
    ids = text_ids(12, 12)
    torch.testing.assert_close(prefill_all(lm, ids), prefill_all(ours, ids), atol=0, rtol=0)


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def test_bf16_checkpoint_loads(tmp_path):
    """bf16 parity, made independent of the CPU's bf16 kernels (AVX-512-BF16/AMX or emulated).

    Our bf16 logits and transformers' bf16 logits both differ from the fp32 reference by bf16 rounding,
    and by how much depends on the CPU, so they are not compared with each other at a fixed atol. What
    is held instead, on any CPU: (1) our rms error against fp32 is within a few bf16 epsilons of the
    logit scale, (2) it is at most twice transformers' own bf16 error on the same machine, and (3) the
    greedy token matches fp32 wherever fp32's top-two margin is far above that rounding noise.
    """
    hf = save_checkpoint(transformers.Qwen2VLForConditionalGeneration, qwen2_config(), tmp_path, torch.bfloat16)
    assert next(iter(load_file(tmp_path / "model.safetensors").values())).dtype == torch.bfloat16
    ids, pixels = image_prompt(GRIDS[1:], 13), pixels_for(GRIDS[1:], 14)
    ref = hf_logits(hf, ids, GRIDS[1:], pixels)  # bf16-rounded weights, run in fp32
    fp32 = prefill_all(load_model(tmp_path), ids, GRIDS[1:], pixels)
    torch.testing.assert_close(fp32, ref, atol=ATOL, rtol=0)
    bf16_model = load_model(tmp_path, dtype=torch.bfloat16)
    assert bf16_model.config.dtype == torch.bfloat16
    bf16 = prefill_all(bf16_model, ids, GRIDS[1:], pixels.bfloat16())
    hf_bf16 = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ref_bf16 = hf_logits(hf_bf16, ids, GRIDS[1:], pixels.bfloat16()).float()
    assert bf16.dtype == torch.float32
    noise = torch.finfo(torch.bfloat16).eps * rms(ref)  # one bf16 rounding step at the logits' scale
    ours_err, theirs_err = rms(bf16 - ref), rms(ref_bf16 - ref)
    assert 0 < ours_err <= 4 * noise, (ours_err, noise)  # 0: the bf16 path really ran in bf16
    assert ours_err <= 2 * theirs_err + 0.1 * noise, (ours_err, theirs_err)
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 16 * noise
    assert decided.sum() >= len(ids) // 2
    assert torch.equal(bf16.argmax(-1)[decided], ref.argmax(-1)[decided])


def to_transformers5_shards(path: Path) -> None:
    """Rewrite a checkpoint as transformers 5 names it in memory (`model.language_model.*`, `model.visual.*`),
    in two shards with an index, to cover that layout and sharded loading."""
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in weights.items()}
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: renamed[k].contiguous() for k in shard_keys}, path / name)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_qwen2_5_vl_matches(tmp_path):
    hf = save_checkpoint(transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_config(), tmp_path)
    to_transformers5_shards(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert ours.config.text.tie_word_embeddings
    pixels = pixels_for(GRIDS, 15)
    with torch.no_grad():
        ref_embeds = hf.model.visual(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
    torch.testing.assert_close(torch.cat(ours.encode(pixels, torch.tensor(GRIDS))), ref_embeds, atol=ATOL, rtol=0)
    ids = image_prompt(GRIDS, 16)
    ref = hf_logits(hf, ids, GRIDS, pixels)
    torch.testing.assert_close(prefill_all(ours, ids, GRIDS, pixels), ref, atol=ATOL, rtol=0)


def test_missing_weight_is_an_error(qwen2_checkpoint, tmp_path):
    src = qwen2_checkpoint[0]
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(KeyError, match=r"layers\.1\.self_attn\.qkv_proj\.weight\[1\]"):
        load_model(tmp_path)
    load_model(tmp_path, load_lm=False)  # the vision tower alone is complete

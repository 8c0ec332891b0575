"""Our Qwen2-VL / Qwen2.5-VL against transformers on the same random checkpoint (fp32, atol 1e-4)."""
from __future__ import annotations

import random

import pytest
import torch

from runtime.forward_batch import KVPool
from runtime.models import load_model
from model_utils import PagedSequences, Step

transformers = pytest.importorskip("transformers")

VOCAB, IMG, VID, VSTART, VEND = 300, 290, 291, 288, 289
PATCH_DIM = 3 * 2 * 14 * 14
GRIDS = [(1, 16, 16), (1, 12, 20)]
ATOL = 1e-4

TEXT = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def qwen2_config():
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, initializer_range=0.1)
    return transformers.Qwen2VLConfig(text_config=TEXT, vision_config=vision, **IDS)


def qwen2_5_config():
    vision = dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=128,
                  window_size=112, fullatt_block_indexes=[1], initializer_range=0.1)
    return transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=vision, **IDS)


def save_checkpoint(cls, config, path, dtype=torch.float32):
    torch.manual_seed(0)
    hf = cls(config).eval()
    hf.to(dtype).save_pretrained(path)
    return hf.float()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2vl")
    hf = save_checkpoint(transformers.Qwen2VLForConditionalGeneration, qwen2_config(), path)
    return hf, load_model(path)


def text_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 280) for _ in range(n)]


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


def new_pool(model, num_pages: int = 64, page_size: int = 1, dtype=None) -> KVPool:
    c = model.config
    return KVPool(c.num_layers, num_pages, page_size, c.num_kv_heads, c.head_dim, dtype or c.dtype)


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


def test_ragged_prefill_then_batched_decode(qwen2):
    hf, ours = qwen2
    prompts = [text_ids(7, 2), image_prompt(GRIDS[1:], 3), text_ids(23, 4)]
    pixels = pixels_for(GRIDS[1:], 5)
    embeds = torch.cat(ours.encode(pixels, torch.tensor(GRIDS[1:])))
    kv = new_pool(ours, 256, page_size=4)
    seqs = PagedSequences(kv)
    rope = [ours.rope_positions(p, GRIDS[1:] if i == 1 else ()) for i, p in enumerate(prompts)]
    batch = seqs.build([Step(i, p, rope[i][0]) for i, p in enumerate(prompts)], image_embeds=embeds)
    logits = ours.prefill(batch, kv)
    seqs_ids = [list(p) for p in prompts]
    for step in range(6):
        for i, ids in enumerate(seqs_ids):
            grids = GRIDS[1:] if i == 1 else ()
            ref = hf_logits(hf, ids, grids, pixels if grids else None)[-1]
            torch.testing.assert_close(logits[i], ref, atol=ATOL, rtol=0, msg=f"seq {i} step {step}")
            ids.append(int(logits[i].argmax()))
        if step == 5:
            break
        steps = [Step(i, [ids[-1]], torch.full((3, 1), len(ids) - 1 + rope[i][1])) for i, ids in enumerate(seqs_ids)]
        logits = ours.decode(seqs.build(steps, is_decode=True), kv)

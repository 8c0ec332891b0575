"""Train the embedded shapes model: a small Qwen2-VL that answers questions about `scene.Scene` images.

    python -m runtime.shapes.train OUT_DIR [--vision-steps N] [--steps N] [--seed S]

Reproducible: the tokenizer, the initial weights and every training scene come from `--seed` (the held-out
sets use other seeds). Two stages:
1. `--vision-steps`: the vision tower alone, on the probe losses of `runtime.shapes.probe` (no LM forward,
   so a step is cheap and the tower learns to see before the LM learns to read);
2. `--steps`: the tower and the LM jointly, end to end, on multi-turn chats about one image each (the first
   turn is exactly the single-question prompt served at inference; later turns add supervision per
   vision-tower pass), with the probe losses kept.
The image processor resizes every image to at most `MAX_PIXELS` (the model sees 112-448 px images at
112-168 px: shapes stay several patches wide, and an image is at most 36 tokens). The checkpoint is saved
in fp16 every `--save-every` joint steps and at the end, each time with a held-out evaluation.
"""
from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.preprocess import Processor
from runtime.shapes.probe import Probe, token_targets
from runtime.shapes.scene import (
    HELD_OUT_SEED,
    KINDS,
    MAX_SIDE,
    MIN_SIDE,
    Question,
    Scene,
    held_out,
    is_correct,
    questions,
    random_scene,
)
from runtime.tiny_model import ModelSize, build_config, build_tokenizer, preprocessor_config, write_json

MODEL = ModelSize(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, mrope_section=(8, 12, 12),
                  vision_dim=128, vision_layers=4, vision_heads=4)
VOCAB_SIZE = 2048
IGNORE = -100
PROBE_WEIGHT = 0.5
MAX_PIXELS = 6 * 6 * 28 * 28  # 168x168: 6x6 merged tokens at most
FOCUS_WEIGHT = 3  # a `--focus` kind is drawn this many times as often as another


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500
    vision_steps: int = 2000
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    save_every: int = 100
    eval_n: int = 36
    init: Path | None = None
    token_kind: bool = False
    focus: tuple[str, ...] = ()
    crowded: float = 0.0  # stage 2: this fraction of scenes has 3 shapes (the rest 1-3, uniformly)


def english_corpus(seed: int) -> list[str]:
    """Python's own English documentation topics, plus the task's questions and answers."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    task = [f"{q.text} {q.answer}" for _ in range(300) for q in questions(random_scene(rng, 224, 224))]
    return list(topics.values()) + task


def prepare_dir(out: Path, seed: int) -> Processor:
    """Write the tokenizer, config and image processor; return the Processor that reads them."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("qwen2_vl", corpus=english_corpus(seed), vocab_size=VOCAB_SIZE)
    tokenizer.save_pretrained(out)
    config = build_config(MODEL, tokenizer, initializer_range=0.02)
    config.save_pretrained(out)
    text = config.text_config
    GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=[text.eos_token_id, text.pad_token_id],
                     pad_token_id=text.pad_token_id, do_sample=False).save_pretrained(out)
    write_json(out / "preprocessor_config.json", preprocessor_config(MAX_PIXELS))
    return Processor(out)


def chat(scene: Scene, asked: list[Question]) -> list[dict]:
    first = [{"type": "image", "image": scene.image()}, {"type": "text", "text": asked[0].text}]
    messages: list[dict] = []
    for i, q in enumerate(asked):
        messages.append({"role": "user", "content": first if i == 0 else q.text})
        messages.append({"role": "assistant", "content": q.answer})
    return messages


def example(processor: Processor, scene: Scene, asked: list[Question]):
    """Token ids, labels (only the answers and their end token) and the image input for one chat."""
    prepared = processor.prepare(chat(scene, asked), add_generation_prompt=False)
    ids = list(prepared.input_ids)
    labels = [IGNORE] * len(ids)
    tok = processor.tokenizer
    header = [tok.convert_tokens_to_ids("<|im_start|>")] + tok.encode("assistant\n")
    starts = [i + len(header) for i in range(len(ids)) if ids[i:i + len(header)] == header]
    for start, q in zip(starts, asked, strict=True):
        answer = tok.encode(q.answer) + [tok.convert_tokens_to_ids("<|im_end|>")]
        assert ids[start:start + len(answer)] == answer, "answer tokens differ from their standalone encoding"
        labels[start:start + len(answer)] = answer
    return ids, labels, prepared.images[0]


def sample_questions(rng: random.Random, scene: Scene, focus: tuple[str, ...] = ()) -> list[Question]:
    """1-4 questions, each of a kind drawn from the kinds this scene has: uniformly, except that a kind in
    `focus` weighs FOCUS_WEIGHT."""
    by_kind: dict[str, list[Question]] = {}
    for q in questions(scene):
        by_kind.setdefault(q.kind, []).append(q)
    kinds = [k for k in sorted(by_kind) for _ in range(FOCUS_WEIGHT if k in focus else 1)]
    return [rng.choice(by_kind[rng.choice(kinds)]) for _ in range(rng.randint(1, 4))]


def training_scene(rng: random.Random, crowded: float = 0.0) -> Scene:
    width, height = rng.randrange(MIN_SIDE, MAX_SIDE + 1), rng.randrange(MIN_SIDE, MAX_SIDE + 1)
    # No draw at all when crowded is 0, so that the runs from before `crowded` replay exactly.
    return random_scene(rng, width, height, 3 if crowded and rng.random() < crowded else None)


def vision_batch(processor: Processor, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """Pixels, patch grids and probe targets of `size` new scenes (stage 1: no text)."""
    images, targets = [], []
    for i in range(size):
        scene = training_scene(rng)
        images.append(processor.process_image(scene.image()))
        targets.append(token_targets(scene, images[-1].grid_thw, i))
    return (torch.cat([im.pixel_values for im in images]), torch.tensor([im.grid_thw for im in images]),
            torch.cat(targets))


def make_batch(processor: Processor, rng: random.Random, size: int, pad_id: int,
               focus: tuple[str, ...] = (), crowded: float = 0.0) -> tuple[dict, torch.Tensor]:
    """Model inputs for `size` chats (right-padded) and the probe targets of their image tokens."""
    rows, targets = [], []
    for i in range(size):
        scene = training_scene(rng, crowded)
        rows.append(example(processor, scene, sample_questions(rng, scene, focus)))
        targets.append(token_targets(scene, rows[-1][2].grid_thw, i))
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((size, width), pad_id)
    labels = torch.full((size, width), IGNORE)
    mask = torch.zeros((size, width), dtype=torch.long)
    for i, (row_ids, row_labels, _) in enumerate(rows):
        ids[i, :len(row_ids)], labels[i, :len(row_ids)], mask[i, :len(row_ids)] = (
            torch.tensor(row_ids), torch.tensor(row_labels), 1)
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask,
              "mm_token_type_ids": (ids == processor.image_token_id).int(),
              "pixel_values": torch.cat([img.pixel_values for _, _, img in rows]),
              "image_grid_thw": torch.tensor([img.grid_thw for _, _, img in rows])}
    return inputs, torch.cat(targets)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last quarter."""
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_from = int(steps * 0.75)
    return peak if step < decay_from else peak * (steps - step) / max(1, steps - decay_from)


@torch.no_grad()
def evaluate(model, processor: Processor, n: int, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Greedy accuracy per question kind on `n` held-out (scene, question) pairs."""
    model.eval()
    right = {k: [] for k in KINDS}
    for scene, q in held_out(seed, n):
        prepared = processor.prepare([{"role": "user", "content": [
            {"type": "image", "image": scene.image()}, {"type": "text", "text": q.text}]}])
        img, ids = prepared.images[0], torch.tensor([prepared.input_ids])
        out = model.generate(input_ids=ids, pixel_values=img.pixel_values, image_grid_thw=torch.tensor([img.grid_thw]),
                             mm_token_type_ids=(ids == processor.image_token_id).int(), max_new_tokens=48,
                             do_sample=False)
        reply = processor.tokenizer.decode(out[0, len(prepared.input_ids):], skip_special_tokens=True)
        right[q.kind].append(is_correct(q, reply))
    model.train()
    return {k: sum(v) / len(v) for k, v in right.items() if v}


def train(out: Path, cfg: TrainConfig) -> None:
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(cfg.seed)
    processor = prepare_dir(out, 0)  # the tokenizer is always seed 0's, so a later stage can start from `init`
    if cfg.init is None:
        model = Qwen2VLForConditionalGeneration(AutoConfig.from_pretrained(out))
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(cfg.init, dtype=torch.float32)
    model = model.to(torch.float32).train()
    probe, rng = Probe(model, MODEL.hidden, cfg.token_kind), random.Random(cfg.seed)
    vision = list(model.model.visual.parameters()) + list(probe.parameters())
    run_stage("vision", cfg.vision_steps, cfg.lr, vision, lambda: vision_step(model, probe, processor, rng, cfg.batch))
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def saved(step: int, t0: float) -> None:
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
            save(model, out)
            print(f"saved at step {step + 1} ({time.time() - t0:.0f}s); held-out accuracy "
                  f"{evaluate(model, processor, cfg.eval_n)}", flush=True)

    run_stage("joint", cfg.steps, cfg.lr, list(model.parameters()) + list(probe.parameters()),
              lambda: joint_step(model, probe, processor, rng, cfg, pad_id), saved)


def vision_step(model, probe: Probe, processor: Processor, rng: random.Random, batch: int) -> dict[str, torch.Tensor]:
    pixels, grid, targets = vision_batch(processor, rng, batch)
    model.model.visual(pixels, grid_thw=grid)  # the probe's hook captures the merged tokens
    return probe.losses(targets)


def joint_step(model, probe: Probe, processor: Processor, rng: random.Random, cfg: TrainConfig,
               pad_id: int) -> dict[str, torch.Tensor]:
    inputs, targets = make_batch(processor, rng, cfg.batch, pad_id, cfg.focus, cfg.crowded)
    return {"lm": model(**inputs).loss} | probe.losses(targets)


def run_stage(name: str, steps: int, lr: float, params: list, step_fn, after=None) -> None:
    """AdamW over `params` for `steps` steps of `step_fn` (a dict of losses: the LM's counts 1, the probe's
    PROBE_WEIGHT), logging smoothed losses every 25 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    t0, smooth = time.time(), {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        losses = step_fn()
        total = sum(v if k == "lm" else PROBE_WEIGHT * v for k, v in losses.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        smooth = {k: v.item() if step == 0 else 0.95 * smooth[k] + 0.05 * v.item() for k, v in losses.items()}
        if step % 25 == 0:
            shown = " ".join(f"{k} {v:.3f}" for k, v in smooth.items())
            print(f"{name} step {step} {shown} lr {lr_at(step, steps, lr):.2e} {time.time() - t0:.0f}s", flush=True)
        if after is not None:
            after(step, t0)


def save(model: torch.nn.Module, out: Path) -> None:
    """The fp16 checkpoint, leaving the fp32 training weights as they are."""
    half = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    dtype, model.config.dtype = model.config.dtype, torch.float16
    try:
        model.save_pretrained(out, state_dict=half, safe_serialization=True)
    finally:
        model.config.dtype = dtype
    (out / "model.safetensors").chmod(0o644)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    d = TrainConfig()
    p.add_argument("--vision-steps", type=int, default=d.vision_steps, help="stage 1: the tower on the probe alone")
    p.add_argument("--steps", type=int, default=d.steps, help="stage 2: the tower and the LM jointly")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--eval-n", type=int, default=d.eval_n, help="held-out questions asked at each save")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init", type=Path, default=d.init, help="start from this checkpoint (a later training stage)")
    p.add_argument("--token-kind", action="store_true", help="the probe also asks every shape token for its kind")
    p.add_argument("--focus", action="append", default=[], choices=KINDS,
                   help=f"a question kind drawn {FOCUS_WEIGHT}x as often in stage 2 (repeatable)")
    p.add_argument("--crowded", type=float, default=d.crowded, help="stage 2: the fraction of 3-shape scenes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, TrainConfig(args.steps, args.vision_steps, args.batch, args.lr, args.seed, args.save_every,
                                args.eval_n, args.init, args.token_kind, tuple(args.focus), args.crowded))


if __name__ == "__main__":
    main()

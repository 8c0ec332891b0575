"""Seeded synthetic workloads shaped like public multimodal benchmarks.

No dataset is downloaded: each generator draws prompt shapes, image sizes and answer lengths from
distributions that approximate the published statistics of the named set (sources in comments).
Every image is pre-encoded as a base64 data URL here, before the benchmark clock starts.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.serving.images import image_data_url, pil_data_url

Rng = np.random.Generator
Size = tuple[int, int]

FILLER = ("the", "a", "red", "blue", "sign", "left", "right", "near", "small", "large", "car", "man",
          "street", "shop", "door", "table", "cup", "book", "tree", "dog", "cat", "text", "top", "bottom")
# OpenImages (TextCaps, TextVQA) ships images resized to at most 1024 px on the long side.
OPENIMAGES_SIZES: tuple[Size, ...] = ((1024, 768), (768, 1024), (1024, 683), (1024, 576))
# COCO val2014 (POPE) images are mostly 640x480 / 480x640.
COCO_SIZES: tuple[Size, ...] = ((640, 480), (480, 640), (640, 427))
# MME mixes COCO-like photos, posters, charts and code screenshots of many sizes.
MME_SIZES: tuple[Size, ...] = ((224, 224), (448, 448), (640, 480), (512, 768), (1024, 768))
# VizWiz photos come from phones and vary a lot in size and framing.
VIZWIZ_SIZES: tuple[Size, ...] = ((480, 640), (640, 480), (336, 448), (1024, 768), (224, 224))
POPE_OBJECTS = ("person", "dog", "car", "chair", "bottle", "cup", "bus", "umbrella", "clock", "bench")


@dataclass(frozen=True)
class BenchRequest:
    messages: tuple[dict, ...]  # OpenAI chat messages, images inline as data URLs
    output_len: int
    num_images: int
    dataset: str
    session: str = ""  # multi-turn traces: the conversation this turn belongs to
    question_kind: str = ""  # datasets with known answers (shapes): the question's kind and its right answer
    expected: str = ""
    response_format: dict | None = None


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str
    num_prompts: int
    seed: int = 0
    output_len: int | None = None  # fixes every request's max_tokens; else the dataset's distribution
    input_len: int = 16  # fixed: text words in the prompt
    image_size: int = 224  # fixed: square image side


def words(rng: Rng, n: int) -> str:
    return " ".join(FILLER[int(i)] for i in rng.integers(0, len(FILLER), n))


def image_part(size: Size, seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_url(size[0], size[1], seed)}}


def user(images: list[dict], text: str) -> dict:
    return {"role": "user", "content": [*images, {"type": "text", "text": text}]}


def pick(rng: Rng, options: tuple) -> object:
    return options[int(rng.integers(0, len(options)))]


def single(rng: Rng, cfg: WorkloadConfig, i: int, sizes: tuple[Size, ...], text: str, out: int) -> BenchRequest:
    img = image_part(pick(rng, sizes), cfg.seed * 1_000_003 + i)  # type: ignore[arg-type]
    return BenchRequest((user([img], text),), cfg.output_len or out, 1, cfg.dataset)


def textcaps(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # TextCaps (Sidorov et al. 2020): fixed short captioning instruction; reference captions
    # average ~12 words, so answers of ~10-30 tokens.
    return single(rng, cfg, i, OPENIMAGES_SIZES, "Provide a one-sentence caption for the provided image.",
                  int(rng.integers(10, 31)))


def pope(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # POPE (Li et al. 2023): "Is there a <object> in the image?" over COCO; answers are yes/no.
    q = f"Is there a {pick(rng, POPE_OBJECTS)} in the image? Please answer yes or no."
    return single(rng, cfg, i, COCO_SIZES, q, int(rng.integers(1, 4)))


def mme(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # MME (Fu et al. 2023): one short yes/no-style question per image, instruction-suffixed; short answers.
    q = f"Is the {words(rng, int(rng.integers(2, 6)))} shown in this image? Please answer yes or no."
    return single(rng, cfg, i, MME_SIZES, q, int(rng.integers(1, 6)))


def textvqa(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # TextVQA (Singh et al. 2019): questions average ~7 words, answers 1-3 words; OpenImages photos.
    q = f"What does the {words(rng, int(rng.integers(3, 9)))} say? Answer with a single word or phrase."
    return single(rng, cfg, i, OPENIMAGES_SIZES, q, int(rng.integers(2, 9)))


def vizwiz(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # VizWiz-VQA (Gurari et al. 2018): short spoken questions from blind users, phone photos of very
    # varied size; short answers, often "unanswerable".
    q = f"What is this {words(rng, int(rng.integers(1, 7)))}? Answer briefly, or say unanswerable."
    return single(rng, cfg, i, VIZWIZ_SIZES, q, int(rng.integers(1, 11)))


def fixed(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # The headline shape: one square image, `input_len` text words, `output_len` tokens.
    s = cfg.image_size
    return single(rng, cfg, i, ((s, s),), words(rng, cfg.input_len), cfg.output_len or 32)


def multi_image(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    # Multi-image comparison (MANTIS/MuirBench-like): 2-8 images per request, medium answers.
    n = int(rng.integers(2, 9))
    imgs = [image_part(pick(rng, ((224, 224), (336, 336), (448, 448))), cfg.seed * 1_000_003 + i * 8 + k)
            for k in range(n)]
    text = "Compare these images and describe what differs between them."
    return BenchRequest((user(imgs, text),), cfg.output_len or int(rng.integers(16, 65)), n, cfg.dataset)


def tool_call(rng: Rng, turn: int) -> str:
    x, y = (int(v) for v in rng.integers(0, 1024, 2))
    return json.dumps({"name": "click", "arguments": {"x": x, "y": y, "step": turn}})


def agent_session(rng: Rng, cfg: WorkloadConfig, sid: int, turns: int) -> list[BenchRequest]:
    """A GUI-agent trace: each turn adds a new screenshot and resends the history, so every earlier
    screenshot is reused (same bytes) in later turns. The last 3 screenshots stay in the context."""
    system = {"role": "system", "content": "You operate a computer. Reply with one JSON tool call."}
    history: list[dict] = []
    out: list[BenchRequest] = []
    for t in range(turns):
        shot = image_part((672, 448), cfg.seed * 1_000_003 + sid * 64 + t)
        history.append(user([shot], f"Step {t}: {words(rng, 8)}. What next?"))
        keep = [m for j, m in enumerate(history) if m["role"] == "assistant" or j >= len(history) - 5]
        msgs = (system, *keep)
        n_img = sum(1 for m in msgs if m["role"] == "user")
        out.append(BenchRequest(msgs, cfg.output_len or int(rng.integers(20, 61)), n_img, cfg.dataset, f"s{sid}"))
        history.append({"role": "assistant", "content": tool_call(rng, t)})
    return out


def agent(rng: Rng, cfg: WorkloadConfig) -> list[BenchRequest]:
    reqs: list[BenchRequest] = []
    sid = 0
    while len(reqs) < cfg.num_prompts:
        reqs += agent_session(rng, cfg, sid, int(rng.integers(3, 7)))
        sid += 1
    return reqs[: cfg.num_prompts]


def few_shot_prefix(cfg: WorkloadConfig) -> list[dict]:
    """A shared system prompt and 3 worked examples with fixed images: identical in every request."""
    msgs: list[dict] = [{"role": "system", "content": "You label product photos. " + "Be precise. " * 20}]
    for k, label in enumerate(("mug", "lamp", "shoe")):
        msgs.append(user([image_part((336, 336), 7_000_000 + cfg.seed * 10 + k)], "Label this product."))
        msgs.append({"role": "assistant", "content": f"Label: {label}"})
    return msgs


def shared_prefix(rng: Rng, cfg: WorkloadConfig, i: int) -> BenchRequest:
    query = user([image_part((336, 336), cfg.seed * 1_000_003 + i)], "Label this product.")
    return BenchRequest((*few_shot_prefix(cfg), query), cfg.output_len or int(rng.integers(3, 9)), 4, cfg.dataset)


def shapes(cfg: WorkloadConfig) -> list[BenchRequest]:
    # The embedded model's task, on held-out scenes (a seed range training never draws from); answers known.
    from runtime.shapes.scene import HELD_OUT_SEED, JSON_SCHEMA, held_out

    schema = {"type": "json_schema", "json_schema": {"name": "shapes", "schema": JSON_SCHEMA}}
    out = []
    for scene, q in held_out(HELD_OUT_SEED + cfg.seed, cfg.num_prompts):
        img = {"type": "image_url", "image_url": {"url": pil_data_url(scene.image())}}
        out.append(BenchRequest((user([img], q.text),), cfg.output_len or 64, 1, cfg.dataset, "", q.kind, q.answer,
                                schema if q.kind == "json" else None))
    return out


PerRequest = Callable[[Rng, WorkloadConfig, int], BenchRequest]
PER_REQUEST: dict[str, PerRequest] = {
    "textcaps": textcaps, "pope": pope, "mme": mme, "textvqa": textvqa, "vizwiz": vizwiz,
    "fixed": fixed, "multi-image": multi_image, "shared-prefix": shared_prefix,
}
DATASETS = (*PER_REQUEST, "agent", "shapes")


def build_workload(cfg: WorkloadConfig) -> list[BenchRequest]:
    """`cfg.num_prompts` requests, deterministic in `cfg.seed`, images already encoded."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.dataset == "agent":
        return agent(rng, cfg)
    if cfg.dataset == "shapes":
        return shapes(cfg)
    if cfg.dataset not in PER_REQUEST:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; choose from {', '.join(DATASETS)}")
    return [PER_REQUEST[cfg.dataset](rng, cfg, i) for i in range(cfg.num_prompts)]

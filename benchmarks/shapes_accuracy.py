"""Held-out accuracy of the embedded shapes model through `epd serve` and the official openai client.

    .venv/bin/python -m benchmarks.shapes_accuracy --model CKPT [--launch EPD --launch E,P,D ...]
        [--per-kind 100] [--base-url URL] [--json results/shapes_accuracy.json]

Each `--launch` topology is started with `epd serve CKPT`, asked the same held-out questions (scenes from a
seed range training never draws from), and scored per question kind; the answers of every topology are
compared with the first's. JSON-mode questions go out with the scene schema as `response_format`.
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from benchmarks.serving.images import pil_data_url
from benchmarks.serving.launch import launched
from runtime.shapes.scene import HELD_OUT_SEED, JSON_SCHEMA, KINDS, Question, Scene, held_out, is_correct

SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "shapes", "schema": JSON_SCHEMA}}


def ask(client: openai.OpenAI, model: str, scene: Scene, q: Question) -> str:
    extra = {"response_format": SCHEMA_FORMAT} if q.kind == "json" else {}
    reply = client.chat.completions.create(model=model, max_tokens=64, temperature=0, **extra, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": pil_data_url(scene.image())}},
                                     {"type": "text", "text": q.text}]}])
    return reply.choices[0].message.content or ""


def run(url: str, pairs: list[tuple[Scene, Question]], concurrency: int) -> dict:
    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key="none", timeout=300, max_retries=0)
    model = client.models.list().data[0].id
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda p: ask(client, model, *p), pairs))
    elapsed = time.perf_counter() - t0
    per_kind = {}
    for kind in KINDS:
        marks = [is_correct(q, a) for (_, q), a in zip(pairs, answers) if q.kind == kind]
        per_kind[kind] = {"right": sum(marks), "total": len(marks), "accuracy": sum(marks) / max(1, len(marks))}
    wrong = [{"question": q.text, "expected": q.answer, "answer": a}
             for (_, q), a in zip(pairs, answers) if not is_correct(q, a)]
    return {"per_kind": per_kind, "answers": answers, "wrong": wrong[:20], "elapsed_s": round(elapsed, 2),
            "requests_per_s": round(len(pairs) / elapsed, 3)}


def table(label: str, result: dict) -> str:
    rows = [f"[{label}] {result['requests_per_s']} req/s over {len(result['answers'])} questions",
            f"{'kind':<10}{'right':>7}{'total':>7}{'accuracy':>10}"]
    rows += [f"{k:<10}{v['right']:>7}{v['total']:>7}{v['accuracy']:>10.1%}" for k, v in result["per_kind"].items()]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launch", action="append", default=None, help="topology to start (repeatable; default EPD)")
    ap.add_argument("--model", default=None, help="checkpoint dir to serve (default: the shipped 'shapes' model)")
    ap.add_argument("--launch-args", default="--log-level warning")
    ap.add_argument("--base-url", default=None, help="use a running server instead of launching one")
    ap.add_argument("--per-kind", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="held-out set HELD_OUT_SEED + seed")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    pairs = held_out(HELD_OUT_SEED + args.seed, args.per_kind * len(KINDS))
    results = {}
    if args.base_url:
        results[args.base_url] = run(args.base_url, pairs, args.concurrency)
    for spec in args.launch or ([] if args.base_url else ["EPD"]):
        with launched(spec, args.model or "shapes", args.launch_args.split(), Path("results/logs")) as url:
            results[spec] = run(url, pairs, args.concurrency)
    first = next(iter(results.values()))["answers"]
    for label, result in results.items():
        result["same_answers_as_first"] = result["answers"] == first
        print(table(label, result), f"\nsame answers as {next(iter(results))}: {result['same_answers_as_first']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"per_kind": args.per_kind, "seed": args.seed, "results": results}, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()

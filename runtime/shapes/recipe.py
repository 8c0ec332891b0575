"""The shipped shapes checkpoint, from scratch: the five training runs it came from, in order.

    python -m runtime.shapes.recipe WORK_DIR      # about 6 hours on 2 cores (docs/shapes_model.md)

Each stage starts from the one before (`init`) and writes WORK_DIR/<name>; the last is the checkpoint
`runtime/shapes/checkpoint/` holds. A finished stage leaves DONE beside its weights and is skipped, so an
interrupted recipe starts again at the stage it was in.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from runtime.shapes.train import TrainConfig, train

DONE = ".recipe-done"
# (name, torch threads, config): the runs of docs/shapes_model.md, S to S5.
STAGES: tuple[tuple[str, int, TrainConfig], ...] = (
    ("S", 2, TrainConfig(vision_steps=2000, steps=1500, save_every=500, eval_n=60)),
    ("S2", 1, TrainConfig(vision_steps=0, steps=3000, seed=2, lr=7e-4, save_every=500, eval_n=60)),
    ("S3", 1, TrainConfig(vision_steps=800, steps=2000, seed=3, lr=7e-4, save_every=250, eval_n=60,
                          token_kind=True)),
    ("S4", 1, TrainConfig(vision_steps=0, steps=2000, seed=4, lr=4e-4, save_every=250, eval_n=48,
                          token_kind=True, focus=("describe", "json"))),
    ("S5", 2, TrainConfig(vision_steps=0, steps=2000, seed=5, lr=3e-4, save_every=250, eval_n=48,
                          token_kind=True, focus=("describe", "json"), crowded=0.5)),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work_dir", type=Path)
    work = p.parse_args().work_dir
    previous = None
    for name, threads, cfg in STAGES:
        out = work / name
        if not (out / DONE).exists():
            torch.set_num_threads(threads)
            print(f"stage {name}: {cfg}", flush=True)
            train(out, replace(cfg, init=previous))
            (out / DONE).touch()
        previous = out
    print(f"done: {previous}")


if __name__ == "__main__":
    main()

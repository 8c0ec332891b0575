"""The `epd` command line.

Each subcommand is a registrar in `SUBCOMMANDS`: it adds its parser and sets `handler`, a function
taking the parsed args and returning an exit code. Handlers import heavy modules lazily so that
`epd --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

Registrar = Callable[["argparse._SubParsersAction"], None]


def _make_tiny_model(args: argparse.Namespace) -> int:
    from runtime.tiny_model import build_tiny_model, copy_trained_model

    if args.trained:
        print(f"wrote the trained shapes Qwen2-VL checkpoint to {copy_trained_model(args.dir)}")
        return 0
    arch = "llava" if args.arch == "llava" else "qwen2_vl"
    out = build_tiny_model(args.dir, size=args.size, seed=args.seed, arch=arch)
    print(f"wrote {args.size} {'LLaVA-1.5' if arch == 'llava' else 'Qwen2-VL'} checkpoint (seed {args.seed}) to {out}")
    return 0


def _register_make_tiny_model(subparsers: "argparse._SubParsersAction") -> None:
    from runtime.tiny_model import SIZES

    p = subparsers.add_parser("make-tiny-model",
                              help="write a random-weight Qwen2-VL or LLaVA checkpoint (or the trained shapes model)")
    p.add_argument("dir", help="output directory")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--arch", choices=("qwen2_vl", "llava"), default="qwen2_vl",
                   help="qwen2_vl (default) or llava (LLaVA-1.5: CLIP tower, projector, Llama LM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trained", action="store_true",
                   help="the shipped shapes model instead (trained weights; --size, --arch and --seed do not apply)")
    p.set_defaults(handler=_make_tiny_model)


def _register_serve(subparsers: "argparse._SubParsersAction") -> None:
    from runtime.server.cli import add_serve_parser

    add_serve_parser(subparsers)


def _register_bench(subparsers: "argparse._SubParsersAction") -> None:
    # benchmarks/ is a top-level directory of the repository, not part of the installed packages.
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.append(root)
    try:
        from benchmarks.serving.cli import add_bench_parser
    except ImportError as exc:
        p = subparsers.add_parser("bench", help="benchmark a server (needs the repository's benchmarks/)")
        p.set_defaults(handler=lambda _args, why=str(exc): sys.exit(f"epd bench is unavailable: {why}"))
        return
    add_bench_parser(subparsers)


def _register_plan(subparsers: "argparse._SubParsersAction") -> None:
    from runtime.planner.cli import add_plan_parser

    add_plan_parser(subparsers)


SUBCOMMANDS: dict[str, Registrar] = {
    "make-tiny-model": _register_make_tiny_model,
    "serve": _register_serve,
    "bench": _register_bench,
    "plan": _register_plan,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epd", description="epdlang: disaggregated multimodal LLM serving")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in SUBCOMMANDS.values():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

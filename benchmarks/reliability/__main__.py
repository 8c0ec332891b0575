"""`python -m benchmarks.reliability MODE [--launch SPEC] [--json FILE] ...`: one reliability measurement."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.serving.launch import launched

MODES = {"fuzz": "benchmarks.reliability.fuzz", "faults": "benchmarks.reliability.faults",
         "overload": "benchmarks.reliability.overload", "soak": "benchmarks.reliability.soak"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, module in MODES.items():
        if importlib.util.find_spec(module) is None:
            continue
        p = sub.add_parser(mode, help=importlib.import_module(module).__doc__.splitlines()[0])
        p.add_argument("--launch", default="E,P,D", metavar="SPEC", help="topology of the launched epd serve")
        p.add_argument("--model", default="tiny-random")
        p.add_argument("--serve-args", default="", help="extra `epd serve` flags, one shell-quoted string")
        p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report here")
        p.add_argument("--log-dir", type=Path, default=Path("results/reliability"))
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(MODES[args.mode])
    extra = [*module.SERVE_ARGS, *shlex.split(args.serve_args)]
    with launched(args.launch, args.model, extra, args.log_dir) as url:
        report = module.run(url, args)
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0 if report.get("ok", False) else 1


if __name__ == "__main__":
    sys.exit(main())

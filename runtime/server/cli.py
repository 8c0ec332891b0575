"""`epd serve MODEL ...`: flags to a `ServerConfig`, then run the server."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from runtime.cluster.topology import parse_topology
from runtime.config import DECODE_WAIT_MS_CPU, DECODE_WAIT_ROWS, OVERLAP_MODES, Slo
from runtime.server.config import Limits, ServerConfig
from runtime.tiny_model import resolve_model


def add_serve_parser(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("serve", help="serve a model over HTTP (OpenAI and SGLang APIs)")
    p.add_argument("model", help="model directory; 'tiny' (the trained embedded shapes model, also 'shapes'), or "
                                   "'tiny-random' / 'tiny-llava' (cached random-weight checkpoints)")
    p.add_argument("--instances", default="EPD",
                   help="topology: EPD, E,PD, EP,D, ED,P, E,P,D, 2E,P,D, ... or a YAML file")
    p.add_argument("--transfer", choices=("shm", "zmq"), default="shm",
                   help="data plane between instances: shared memory, or raw zmq frames (with --ray: per link, "
                        "shm within a Ray node and zmq frames across)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="place the instances on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT, or local (a private "
                        "cluster on this machine, stopped at exit); needs the ray extra")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all routes but /health)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="directory image files may be read from (repeatable; none: no local files)")
    p.add_argument("--disable-remote-media", action="store_true", help="refuse http(s) image URLs")
    p.add_argument("--allow-private-media-urls", action="store_true",
                   help="let image URLs reach loopback/private/link-local addresses (refused by default)")
    d = Limits()
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens, help="prompt + output, per request")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens)
    p.add_argument("--max-n", type=int, default=d.max_n)
    p.add_argument("--fetch-timeout", type=float, default=d.fetch_timeout_s, help="seconds per image download")
    p.add_argument("--graceful-shutdown", type=float, default=30.0, help="seconds to drain requests on exit")
    p.add_argument("--kv-cache-mb", type=int, default=None, help="KV pool size (engine default if unset)")
    p.add_argument("--encoder-cache-mb", type=int, default=None,
                   help="image-embedding cache per instance, LRU (engine default 256 if unset)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests decoding at once, per instance")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="prompt tokens per prefill step (longer prompts are chunked), per instance")
    p.add_argument("--mixed-token-budget", type=int, default=None,
                   help="prompt tokens per step while requests are decoding, per instance: bounds the gap a prefill "
                        "puts between their tokens (default: --max-num-batched-tokens)")
    p.add_argument("--encode-token-budget", type=int, default=None,
                   help="image tokens per encode batch (default: 256 on CPU, 4096 on an accelerator)")
    p.add_argument("--decode-wait-ms", type=float, default=None,
                   help=f"fewer than {DECODE_WAIT_ROWS} decoding requests wait this long for a running vision tower "
                        f"(default: {DECODE_WAIT_MS_CPU:g} on CPU, 0 on an accelerator)")
    p.add_argument("--tpot-target-ms", type=float, default=None,
                   help="calibrate the three budgets above at start-up so that a step stays under this TPOT")
    p.add_argument("--no-prefix-cache", action="store_true", help="no radix prefix cache (prompts prefilled whole)")
    p.add_argument("--no-mixed-batches", action="store_true",
                   help="decode and prefill in separate forward passes (default: decode rows ride in the prefill's)")
    overlap = p.add_mutually_exclusive_group()
    overlap.add_argument("--overlap-encode", choices=tuple(OVERLAP_MODES), default=None,
                         help="the vision tower on its own thread beside LM work (on), inside the engine step "
                              "(off), or chosen per encode from the stages' recent work (auto, the default)")
    overlap.add_argument("--no-overlap-encode", action="store_true", help="the same as --overlap-encode off")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads in all (split over the instances)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="requests waiting for a first token at most; beyond it 503 with Retry-After (default: no cap)")
    p.add_argument("--role-switching", action="store_true",
                   help="move instances between roles when one stage stays the bottleneck (loads every tower)")
    Slo.add_arguments(p.add_argument_group("latency targets that --role-switching plans for (with an `epd plan` "
                                           "profile of this model)"))
    p.add_argument("--json-whitespace-flexible", action="store_true",
                   help="JSON output may contain any whitespace (default: compact; a request's x-guidance overrides)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(handler=serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    try:
        topology = parse_topology(args.instances, args.num_threads)
    except ValueError as exc:
        raise SystemExit(f"--instances {args.instances!r}: {exc}") from None
    if args.max_waiting_requests is not None and args.max_waiting_requests < 1:
        raise SystemExit(f"--max-waiting-requests must be at least 1, got {args.max_waiting_requests}")
    for flag in ("max_num_batched_tokens", "mixed_token_budget", "encode_token_budget"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    model = resolve_model(args.model)
    overrides = {"kv_cache_bytes": args.kv_cache_mb and args.kv_cache_mb << 20,
                 "encoder_cache_bytes": args.encoder_cache_mb and args.encoder_cache_mb << 20,
                 "max_model_len": args.max_model_len,
                 "max_running": args.max_num_seqs, "prefill_token_budget": args.max_num_batched_tokens,
                 "mixed_token_budget": args.mixed_token_budget,
                 "encode_token_budget": args.encode_token_budget, "tpot_target_ms": args.tpot_target_ms,
                 "decode_wait_ms": args.decode_wait_ms,
                 "mixed_batches": False if args.no_mixed_batches else None,
                 "overlap_encode": False if args.no_overlap_encode else OVERLAP_MODES.get(args.overlap_encode),
                 "enable_prefix_cache": False if args.no_prefix_cache else None,
                 "json_whitespace_flexible": args.json_whitespace_flexible or None,
                 "role_switching": args.role_switching or None}
    limits = Limits(max_body_bytes=args.max_body_bytes, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_image_bytes=args.max_image_bytes,
                    max_total_tokens=args.max_total_tokens, default_max_tokens=args.default_max_tokens,
                    max_n=args.max_n, fetch_timeout_s=args.fetch_timeout)
    return ServerConfig(
        model_path=model, served_model_name=args.served_model_name or Path(args.model).name,
        host=args.host, port=args.port, api_key=args.api_key,
        allowed_media_dirs=tuple(Path(d) for d in args.allowed_local_media_path),
        allow_remote_media=not args.disable_remote_media, limits=limits,
        allow_private_media_urls=args.allow_private_media_urls,
        graceful_shutdown_s=args.graceful_shutdown,
        engine_overrides={k: v for k, v in overrides.items() if v is not None}, topology=topology,
        transfer=args.transfer, max_waiting_requests=args.max_waiting_requests, ray=args.ray,
        slo=Slo.from_args(args))


def serve(args: argparse.Namespace) -> int:
    from runtime.server.app import run_server

    if args.ray:  # Ray's C++ crash handler would dump a stack trace on the SIGTERM that stops us cleanly
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

    return run_server(config_from_args(args), args.log_level)

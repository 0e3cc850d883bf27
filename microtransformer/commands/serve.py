"""`microtransformer serve`: an OpenAI-compatible HTTP server (and playground) for trained runs.

The app and the engine live in `microtransformer.serve`; this module parses the options, loads
the runs, binds the socket and runs uvicorn with a graceful drain: on SIGTERM (or Ctrl+C) the
socket stays open, /health and new requests get 503 while the ones in flight finish (and for at
least --drain-grace seconds), then the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys

import torch

from microtransformer.device import check_precision, resolve_device
from microtransformer.errors import UserError
from microtransformer.serve.loading import load_served_model
from microtransformer.serve.state import DEFAULT_MAX_BODY_BYTES

API_KEY_ENV = "MICROTRANSFORMER_API_KEY"
COMPILE_AFTER = 64  # a bucket that served this many steps is likely to serve many more


def register(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """Add the `serve` subcommand."""
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                   help="training run directories; each is served as its own model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any)")
    p.add_argument("--best", action="store_true",
                   help="serve best.safetensors (best val loss) instead of the last weights")
    p.add_argument("--model-name", action="append", default=None, metavar="NAME",
                   help="the model's name in the API (once per RUN_DIR; default: the run "
                        "directory's name)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 (or set {API_KEY_ENV})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together per step (slots; default 16)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot before 429 (default 256)")
    p.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="refuse requests asking for more than N new tokens")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"refuse request bodies over N bytes with 413, before parsing them "
                        f"(default {DEFAULT_MAX_BODY_BYTES}, 1 MiB)")
    p.add_argument("--drain-grace", type=float, default=0.0, metavar="SECONDS",
                   help="after SIGTERM keep answering (/health and new requests: 503) for at "
                        "least this long, even with nothing in flight, so a load balancer's "
                        "health checks see the 503 before the port closes (default 0)")
    p.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' for any)")
    p.add_argument("--no-ui", action="store_true", help="do not serve the playground at /")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8", "int8wo"), default="fp32",
                   help="weights and KV cache of the served copy: fp32 (default), bf16 (a CPU "
                        "with avx512_bf16 / amx_bf16, or CUDA; outputs differ from fp32 by "
                        "rounding), int8 (dynamically quantized linears, CPU, never compiled), "
                        "int8wo (int8 weight-only linears with fp32 activations and cache, as "
                        "`generate --dtype int8wo`; compiled like fp32)")
    p.add_argument("--no-compile", action="store_true",
                   help="never compile the decode steps (default on CPU: once a (rows, columns) "
                        "bucket has served --compile-after steps, a background thread loads "
                        "its row count's compiled step (the package `generate` uses, cached "
                        "on disk) or compiles it, the eager step serving meanwhile)")
    p.add_argument("--compile-after", type=int, default=COMPILE_AFTER, metavar="STEPS",
                   help=f"decode steps a bucket serves eagerly before it is queued for "
                        f"compiling (default {COMPILE_AFTER}; 1: on first use)")
    p.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="where each model's engine runs: process (default: a child process "
                        "per model, so the model steps and the HTTP side use two cores "
                        "instead of sharing one GIL) or thread (a thread of the server's "
                        "process)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: the ops of a tiny model's step "
                        "are too small to split, and the HTTP side gets a core)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port={args.port} must be in [0, 65535]")
    if args.max_batch < 1:
        problems.append(f"--max-batch={args.max_batch} must be >= 1")
    if args.max_queue < 1:
        problems.append(f"--max-queue={args.max_queue} must be >= 1")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        problems.append(f"--max-tokens-limit={args.max_tokens_limit} must be >= 1")
    if args.max_body_bytes < 1:
        problems.append(f"--max-body-bytes={args.max_body_bytes} must be >= 1 (default "
                        f"{DEFAULT_MAX_BODY_BYTES})")
    if not 0 <= args.drain_grace <= 3600:  # also refuses nan
        problems.append(f"--drain-grace={args.drain_grace} must be in [0, 3600] seconds")
    if args.compile_after < 1:
        problems.append(f"--compile-after={args.compile_after} must be >= 1")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads={args.threads} must be >= 1")
    names = args.model_name
    if names is not None and len(names) != len(args.run_dirs):
        problems.append(f"--model-name was given {len(names)} times for {len(args.run_dirs)} "
                        "RUN_DIRs; give it once per RUN_DIR, in the same order")
    if problems:
        raise UserError("; ".join(problems))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port is one clear error."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket
    # says TCP, and without it a response's body waits behind its headers for the
    # client's delayed ACK (~40 ms per response on a kept-alive connection)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another "
                        "--port or --host") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    return sock


def run(args: argparse.Namespace) -> int:
    """Load the runs, start the server, drain on SIGTERM."""
    _check(args)
    # deferred: FastAPI and uvicorn add about 0.3 s to every other command's start-up
    # (docs/ARCHITECTURE.md)
    from microtransformer.serve.app import create_app
    from microtransformer.serve.server import serve_until_drained

    device = resolve_device(args.device, option="device")
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:
        check_precision(args.precision, device)
    except ValueError as exc:
        raise UserError(f"--precision {args.precision}: {exc}") from None
    # the compiled step is inductor's C++ CPU code; int8's packed linears cannot be traced
    compile_why = ("--no-compile" if args.no_compile else
                   "CPU only" if device.type != "cpu" else
                   "int8 is never compiled" if args.precision == "int8" else None)
    names = args.model_name or [None] * len(args.run_dirs)
    models = [load_served_model(run_dir, name=name, which="best" if args.best else "last",
                                device=device, max_batch=args.max_batch,
                                max_queue=args.max_queue, precision=args.precision,
                                compile=compile_why is None,
                                compile_after=args.compile_after,
                                process=args.engine == "process",
                                threads=args.threads or (1 if device.type == "cpu" else None))
              for run_dir, name in zip(args.run_dirs, names, strict=True)]
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(models, api_key=api_key, cors=args.cors, ui=not args.no_ui,
                     max_tokens_limit=args.max_tokens_limit,
                     max_body_bytes=args.max_body_bytes)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    for m in models:
        card = m.card
        print(f"model {m.name}: {card['parameters']:,} parameters, context "
              f"{card['max_model_len']}, {card['tokenizer']} tokenizer, on {device}, "
              f"{args.precision}, engine in a "
              + (f"process (pid {m.engine.process.pid})" if args.engine == "process"
                 else "thread") + "; compiled steps: "
              + (f"off ({compile_why})" if compile_why else
                 f"built in the background after {args.compile_after} steps per bucket, "
                 f"loaded at first use where on disk"),
              file=sys.stderr)
    print(f"serving on http://{url_host}:{port} (API /v1, "
          f"{'no playground' if args.no_ui else 'playground /'}, "
          f"{'API key required' if api_key else 'no API key'})", file=sys.stderr, flush=True)
    if not api_key and not ipaddress.ip_address(host).is_loopback:
        print("microtransformer: warning: listening beyond loopback without --api-key",
              file=sys.stderr)
    serve_until_drained(app, sock, drain_grace=args.drain_grace)
    return 0


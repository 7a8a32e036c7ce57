"""Subcommand ``serve`` (registered with ``gasungbi.cli.command``); heavy imports stay inside."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gasungbi.errors import UserError
from gasungbi.infer.commands import add_model_args, load_for_args, tokenizer_for

API_KEY_ENV = "GASUNGBI_API_KEY"


def api_key_of(args: argparse.Namespace) -> str | None:
    """``--api-key``, else the ``GASUNGBI_API_KEY`` environment variable, else None (open)."""
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from gasungbi.serve.app import ServeConfig, create_app
    except ImportError as e:
        raise UserError(f"serving needs {e.name}, a dependency of gasungbi: pip install -e . (or pip install gasungbi)") \
            from None
    import socket

    import torch

    from gasungbi.infer.cache import KVCache
    from gasungbi.infer.placement import format_bytes
    from gasungbi.serve.scheduler import Scheduler

    for flag in ("max_batch", "max_queue", "max_prefill_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = tokenizer_for(args.checkpoint, required=True)
    model = load_for_args(args)
    cfg = model.config
    max_len = min(args.max_len or min(cfg.max_position_embeddings, 4096), cfg.max_position_embeddings)
    if max_len < 2:
        raise UserError(f"--max-len must be >= 2, got {max_len}")
    scheduler = Scheduler(model, args.max_batch, max_len, args.max_queue, args.max_prefill_tokens)
    scheduler.warmup()
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(scheduler, tokenizer, ServeConfig(name, api_key_of(args), args.max_body_bytes))

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    dtype = next(model.parameters()).dtype
    cache = KVCache.bytes_per_token(cfg, dtype) * args.max_batch * max_len
    print(f"gasungbi serve: {name} at http://{host}:{port} ({args.max_batch} sequences x {max_len} tokens, "
          f"KV cache {format_bytes(cache)}; api key {'required' if api_key_of(args) else 'off'})",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the address is printed)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the checkpoint's folder name)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache rows; default 16)")
    p.add_argument("--max-len", type=int, default=None,
                   help="cache slots per sequence: prompt + max_tokens limit (default: the context, at most 4096)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="sequences allowed to wait for a row; beyond that requests get 429 (default 64)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096,
                   help="prompt tokens prefilled between two decode steps (default 4096)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (default 4 MiB)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning)")


_serve.add_args = _serve_args

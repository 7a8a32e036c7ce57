"""CLI: ``gasungbi serve``; heavy imports stay inside."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from tyro.conf import OmitArgPrefixes, UseAppendAction

from gasungbi.errors import UserError
from gasungbi.infer.commands import ModelArgs, conventions_for

API_KEY_ENV = "GASUNGBI_API_KEY"


def api_key_of(flag: str | None) -> str | None:
    """``--api-key``, else the ``GASUNGBI_API_KEY`` environment variable, else None (open)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning printed when the server listens on ``host`` beyond this machine with no API key."""
    from gasungbi.serve.app import is_loopback
    if api_key or is_loopback(host):
        return None
    return (f"warning: listening on {host} with no API key: anyone who can reach this address can use the model "
            f"(set --api-key or ${API_KEY_ENV})")


def refuse_template_files(template: str | None, checkpoint: str) -> None:
    """A :class:`UserError` when the chat template reads other templates (``{% include %}``,
    ``{% import %}``, ``{% from %}``, ``{% extends %}``): the sandbox it renders in has no files to
    read, so every chat request would fail; the server refuses it when it starts instead."""
    if template is None:
        return
    import re

    import jinja2
    from jinja2 import nodes

    tags = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from", nodes.Extends: "extends"}
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
        found = sorted({tag for kind, tag in tags.items() for _ in tree.find_all(kind)})
    except jinja2.exceptions.TemplateError:  # a tag of transformers' own ({% generation %}): read the tags
        found = sorted(set(re.findall(r"{%[-+]?\s*(include|import|from|extends)\b", template)))
    if found:
        raise UserError(f"{checkpoint}: the chat template uses {', '.join('{% ' + t + ' %}' for t in found)}, "
                        "which reads other template files; a chat template must be self-contained")


def serve_cmd(model: Annotated[ModelArgs, OmitArgPrefixes], host: str = "127.0.0.1", port: int = 8000,
              model_name: str | None = None, api_key: str | None = None, max_batch: int = 16,
              max_len: int | None = None, max_queue: int = 64, max_prefill_tokens: int = 4096,
              max_body_bytes: int = 4 * 2**20, threads: int = 0, special_tokens_in_content: bool = False,
              body_timeout: float = 30.0, allowed_host: Annotated[tuple[str, ...], UseAppendAction] = (),
              cors_origin: Annotated[tuple[str, ...], UseAppendAction] = (),
              reasoning_parser: Literal["auto", "none", "deepseek-r1"] = "auto", prefix_cache_gib: float = 1.0,
              log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning") -> int:
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)
    with continuous batching, streaming and a chat page at /.

    Args:
        model: the checkpoint and where it runs
        host: address to bind (127.0.0.1: this machine only)
        port: port (0: any free one; the address is printed)
        model_name: the model id clients send (default: the checkpoint's folder name)
        api_key: require 'Authorization: Bearer KEY' on /v1 routes and /metrics (default: $GASUNGBI_API_KEY if set)
        max_batch: sequences decoded together (cache rows)
        max_len: cache slots per sequence: prompt + max_tokens limit (default: the context, at most 4096)
        max_queue: sequences allowed to wait for a row; beyond that requests get 429
        max_prefill_tokens: prompt tokens prefilled between two decode steps
        max_body_bytes: largest request body
        threads: torch CPU threads (0: torch's choice)
        special_tokens_in_content: read special-token text in chat messages as control tokens (unsafe: lets a message forge turns)
        body_timeout: seconds a client may take to send its request body (408 after)
        allowed_host: a Host name to answer besides loopback ones (with none given, a non-loopback bind answers any)
        cors_origin: a web origin (http://host:port) whose pages may call the API (CORS); '*' for any
        reasoning_parser: deepseek-r1: a chat reply's <think>...</think> is returned as reasoning_content, the
            rest as content (DeepSeek's API, vLLM's deepseek_r1); auto: so where the checkpoint's chat template
            or vocabulary has the think tags; none: all content
        prefix_cache_gib: memory for the cache of prompts' 16-token blocks, reused by later prompts that start the
            same way (a shared system prompt, a conversation's earlier turns), least recently used out; 0: off.
            No effect on DeepSeek-V4, whose cache is not kept per position
        log_level: uvicorn's log level
    """
    try:
        import uvicorn

        from gasungbi.serve.app import ServeConfig, create_app, is_loopback
    except ImportError as e:
        raise UserError(f"serving needs {e.name}, a dependency of gasungbi: pip install -e . (or pip install gasungbi)") \
            from None
    import socket

    import torch

    from gasungbi.infer.cache import KVCache
    from gasungbi.infer.placement import format_bytes
    from gasungbi.serve.scheduler import Scheduler

    for flag, value in (("max_batch", max_batch), ("max_queue", max_queue),
                        ("max_prefill_tokens", max_prefill_tokens), ("max_body_bytes", max_body_bytes)):
        if value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= prefix_cache_gib < float("inf"):
        raise UserError(f"--prefix-cache-gib must be >= 0 (0: off), got {prefix_cache_gib}")
    if body_timeout <= 0:
        raise UserError(f"--body-timeout must be > 0, got {body_timeout}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0 (any free port) to 65535, got {port}")
    if threads < 0:
        raise UserError(f"--threads must be >= 0 (0: torch's choice), got {threads}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    allowed = None if not is_loopback(host) and not allowed_host else allowed_host  # None: any Host
    if threads:
        torch.set_num_threads(threads)
    conventions = conventions_for(model.checkpoint, required=True)
    refuse_template_files(conventions.template, model.checkpoint)
    net = model.load()
    cfg = net.config
    max_len = min(max_len or min(cfg.max_position_embeddings, 4096), cfg.max_position_embeddings)
    if max_len < 2:
        raise UserError(f"--max-len must be >= 2, got {max_len}")
    scheduler = Scheduler(net, max_batch, max_len, max_queue, max_prefill_tokens, compile=model.compile,
                          prefix_cache_bytes=int(prefix_cache_gib * 2**30))
    scheduler.warmup()
    name = model_name or Path(model.checkpoint).resolve().name
    app = create_app(scheduler, conventions.tokenizer,
                     ServeConfig(name, api_key_of(api_key), max_body_bytes, special_tokens_in_content,
                                 body_timeout=body_timeout, allowed_hosts=allowed, cors_origins=cors_origin,
                                 reasoning_parser=reasoning_parser),
                     conventions)

    sock.listen(2048)
    dtype = next(net.parameters()).dtype
    cache = KVCache.bytes_per_token(cfg, dtype, context=max_len) * max_batch * max_len
    prefix = (f"prefix cache {format_bytes(prefix_cache_gib * 2**30)}" if scheduler.batch.prefix
              else "prefix cache off" + (" (DeepSeek-V4's cache is not kept per position)" if prefix_cache_gib else ""))
    print(f"gasungbi serve: {name} at http://{host}:{port} ({max_batch} sequences x {max_len} tokens, "
          f"KV cache {format_bytes(cache)}, {prefix}; api key {'required' if api_key_of(api_key) else 'off'})",
          file=sys.stderr, flush=True)
    if warning := exposure_warning(host, api_key_of(api_key)):
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0

"""Prefix caching in ``gasungbi serve``: time to first token of a chat request whose long system prompt
an earlier request already prefilled, beside the first request's (which prefilled it).

    python benchmarks/prefix_cache.py                   # the small preset (random weights), 2 threads
    python benchmarks/prefix_cache.py --preset cpu-tiny --threads 1

One server of a random-weight ``--preset`` model (its tokenizer a byte-level BPE trained on a few
stdlib files), and a second one with ``--prefix-cache-gib 0`` as the baseline. Each round takes a
new ``--system-tokens``-token system prompt (stdlib text no earlier round used, so the first request
is a miss) and sends two streaming chat requests one after the other, the same system prompt and
different user turns; time to first token is measured by the client (request sent -> first streamed
chunk with content). Printed per server: the first and second request's TTFT (median over
``--rounds``), the second's ``cached_tokens``, and the ratio second / first. Goal: <= 0.35x with the
cache on. A warm-up round with its own system prompt comes first on each server. The client runs
in this process and shares the CPU with the server (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402  (the same server start-up as the load test)

USERS = ["In one line: what does this module do?", "Name two functions it defines, nothing else."]


def make_checkpoint(preset: str, out: Path):
    """A random-weight ``preset`` model, and its tokenizer (a BPE over stdlib files) to cut prompts with."""
    import gasungbi
    from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(stdlib_texts()[:40], 1024)
    save_tokenizer(tok, out / "tok")
    cfg = gasungbi.get_preset(preset).replace(vocab_size=tok.get_vocab_size())
    model = gasungbi.build_model(cfg, seed=0)
    params = sum(p.numel() for p in model.parameters())
    gasungbi.save_model(model, out / preset, tokenizer=out / "tok")
    return out / preset, tok, params


def stdlib_texts() -> list[str]:
    stdlib = Path(os.__file__).parent
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]


def system_prompts(tok, tokens: int, count: int) -> list[str]:
    """``count`` system prompts of ``tokens`` tokens each, from stdlib files the tokenizer was not trained on."""
    out = []
    for text in stdlib_texts()[40:]:
        ids = tok.encode(text).ids
        if len(ids) >= tokens:
            out.append(tok.decode(ids[:tokens]))
        if len(out) == count:
            return out
    raise RuntimeError(f"not enough stdlib files of {tokens} tokens")


def ttft(url: str, system: str, user: str) -> tuple[float, int]:
    """(seconds to the first streamed content, cached_tokens) of one chat request."""
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": 4, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    t0, first, cached = time.perf_counter(), None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    return first, cached


def measure(url: str, prompts: list[str]) -> dict:
    """The first and second request of each system prompt (the first prompt is the warm-up)."""
    ttft(url, prompts[0], USERS[0])
    ttft(url, prompts[0], USERS[1])
    firsts, seconds, cached = [], [], []
    for system in prompts[1:]:
        firsts.append(ttft(url, system, USERS[0])[0])
        t, c = ttft(url, system, USERS[1])
        seconds.append(t)
        cached.append(c)
    first, second = statistics.median(firsts), statistics.median(seconds)
    return {"first": first, "second": second, "cached": min(cached), "ratio": second / first}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=2, help="the servers' torch threads")
    p.add_argument("--system-tokens", type=int, default=800)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok, params = make_checkpoint(args.preset, Path(tmp))
        prompts = system_prompts(tok, args.system_tokens, args.rounds + 1)
        print(f"{args.preset}: {params / 1e6:.1f}M parameters (random weights), {args.threads} thread(s); "
              f"system prompt {args.system_tokens} tokens, {args.rounds} rounds (medians); "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        results = {}
        for name, flags in (("prefix cache on", ()), ("off (--prefix-cache-gib 0)", ("--prefix-cache-gib", "0"))):
            proc, url = start_server(ckpt, args.threads, 4, Path(tmp) / "server.log", *flags)
            try:
                results[name] = measure(url, prompts)
            finally:
                proc.terminate()
                proc.wait(10)
        print(f"{'server':>28} {'TTFT 1st':>9} {'TTFT 2nd':>9} {'cached':>7} {'2nd / 1st':>10}")
        for name, r in results.items():
            print(f"{name:>28} {r['first'] * 1e3:>7.0f}ms {r['second'] * 1e3:>7.0f}ms {r['cached']:>7} "
                  f"{r['ratio']:>9.2f}x")
        print(f"goal: 2nd / 1st <= 0.35x with the cache on; load average {os.getloadavg()[0]:.2f} after the run")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of ``gasungbi serve``: aggregate output tokens/s and time to first token at several
concurrencies against ONE server (continuous batching is what makes concurrency pay).

    python benchmarks/serve_load.py                          # a random cpu-tiny model, its own server
    python benchmarks/serve_load.py --preset small --threads 2
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a server already running

Each of C clients sends ``--requests`` streaming completions one after another (closed loop):
a prompt of ``--prompt-tokens`` token ids, ``--max-tokens`` new tokens, no stop token
(``ignore_eos``), temperature 0. Output tokens/s = all tokens received / wall time of the level;
time to first token is measured by the client (request sent -> first streamed token), p50/p99
over the level's requests. Target: concurrency 8 gives >= 3x the throughput of
concurrency 1. The client runs in this process and shares the CPU with the server; figures are
what this machine gives under whatever else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def make_checkpoint(preset: str, out: Path) -> Path:
    """A random-weight ``preset`` model with a byte-level BPE tokenizer trained on a few stdlib files."""
    import gasungbi
    from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer

    stdlib = Path(os.__file__).parent
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    tok = train_tokenizer(docs, 1024)
    save_tokenizer(tok, out / "tok")
    cfg = gasungbi.get_preset(preset).replace(vocab_size=tok.get_vocab_size())
    gasungbi.save_model(gasungbi.build_model(cfg, seed=0), out / preset, tokenizer=out / "tok")
    return out / preset


def start_server(checkpoint: Path, threads: int, max_batch: int, log: Path,
                 *flags: str) -> tuple[subprocess.Popen, str]:
    """``gasungbi serve CHECKPOINT ... FLAGS`` in a subprocess on a free port; (process, URL) once /health answers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gasungbi", "serve", str(checkpoint), "--port", "0",
                                 "--threads", str(threads), "--max-batch", str(max_batch), *flags],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"at (http://[\d.]+:\d+)", log.read_text())
        if m:
            url = m.group(1)
            while httpx.get(url + "/health").status_code != 200:
                time.sleep(0.1)
            return proc, url
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int, float]:
    """-> (time to first token, tokens received, total time) of one streaming completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            if '"usage": null' not in line:  # parse only the last chunk (the client shares the CPU)
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return ttft or 0.0, tokens, time.perf_counter() - t0


async def level(url: str, model: str | None, concurrency: int, requests: int, prompt_tokens: int,
                max_tokens: int, key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    results: list[tuple[float, int, float]] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for r in range(requests):
            prompt = [(17 * (c * requests + r) + 3 * i) % 200 + 20 for i in range(prompt_tokens)]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            if model:
                body["model"] = model
            results.append(await one_request(http, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, headers=headers, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(concurrency)))
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _, _ in results)
    tokens = sum(n for _, n, _ in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one on a random model)")
    p.add_argument("--model", default=None, help="the model id to send (with --url)")
    p.add_argument("--api-key", default=os.environ.get("GASUNGBI_API_KEY"))
    p.add_argument("--preset", default="cpu-tiny", help="the random model's preset when starting a server")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client at each concurrency")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    proc, tmp = None, None
    url = args.url
    if url is None:
        tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        ckpt = make_checkpoint(args.preset, Path(tmp.name))
        proc, url = start_server(ckpt, args.threads, args.max_batch, Path(tmp.name) / "server.log")
        print(f"server: {args.preset} (random weights) at {url}, {args.threads} thread(s), "
              f"--max-batch {args.max_batch} (ready in {time.perf_counter() - t:.1f} s)")
    try:
        run = lambda c, n: asyncio.run(level(url, args.model, c, n, args.prompt_tokens,  # noqa: E731
                                             args.max_tokens, args.api_key))
        run(1, 1)  # warm up
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; prompt {args.prompt_tokens} tokens, "
              f"{args.max_tokens} new tokens, {args.requests} requests per client")
        print(f"{'concurrency':>11} {'requests':>8} {'tokens/s':>9} {'x c=1':>6} {'TTFT p50':>9} {'TTFT p99':>9}")
        base = None
        for c in (int(x) for x in args.concurrency.split(",")):
            r = run(c, args.requests)
            base = base or r["tokens_per_s"]
            print(f"{c:>11} {r['requests']:>8} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>5.1f}x "
                  f"{r['ttft_p50'] * 1e3:>7.0f}ms {r['ttft_p99'] * 1e3:>7.0f}ms", flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} after the run")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

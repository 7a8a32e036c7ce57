"""Pretraining per CPU-minute: gasungbi against nanoGPT's CPU recipe at equal wall-clock.

    python benchmarks/cpu_minute.py                   # reference, then gasungbi in the same time
    python benchmarks/cpu_minute.py --ref-seconds 80  # skip the reference's training: use this time

1. The reference: a char-level GPT trained with nanoGPT's CPU recipe for tiny Shakespeare
   (README "quick start", CPU: 4 layers, 4 heads, width 128, block 64, batch 12, 2,000
   iterations, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas (0.9, 0.99),
   weight decay 0.1, grad clip 1, no dropout, no biases), timed. Its model is the plain GPT of
   ``train_throughput.py`` (learned positions, LayerNorm, GELU MLP of width 4d).
2. gasungbi: ``gasungbi prepare`` on the same training text, then ``gasungbi train
   --time-budget`` with the reference's training time and gasungbi's defaults for that budget.
3. Both scored on the same held-out bytes (the last 10% of the file) in bits per byte: the summed
   negative log-likelihood of non-overlapping windows (each model's context length) over the
   byte count. Shakespeare is ASCII, so the reference's characters are bytes.

Goal: gasungbi <= 0.85x the reference's bits per byte.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train_throughput import RefGPT

import gasungbi
from gasungbi.data.tokenizer import load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


def split(text: bytes) -> tuple[bytes, bytes]:
    cut = int(0.9 * len(text))
    return text[:cut], text[cut:]


@torch.no_grad()
def windows_bits(score, ids: torch.Tensor, ctx: int) -> float:
    """Summed NLL in bits of ``ids`` [N] predicted in non-overlapping windows of ``ctx`` tokens
    (each window's first token is predicted from nothing before it, so it is not scored)."""
    total = 0.0
    for s in range(0, ids.numel() - 1, ctx):
        chunk = ids[s:s + ctx + 1]
        if chunk.numel() < 2:
            break
        logits = score(chunk[None, :-1])[0]
        total += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
    return total / math.log(2)


def reference(train: bytes, held: bytes, iters: int, seed: int = 1337) -> tuple[float, float]:
    """nanoGPT's CPU recipe on the characters of ``train``; returns (seconds of training, held-out bpb)."""
    torch.manual_seed(seed)
    chars = sorted(set(train) | set(held))
    lut = torch.zeros(256, dtype=torch.long)
    lut[torch.tensor(chars)] = torch.arange(len(chars))
    data = lut[torch.tensor(list(train))]
    model = RefGPT(len(chars), 128, 4, 4, 512, 64)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def lr_at(it: int) -> float:  # nanoGPT's get_lr: warmup 100, cosine to min_lr at lr_decay_iters
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / max(1, iters - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (1e-3 - 1e-4)

    t0 = time.perf_counter()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        ix = torch.randint(len(data) - 64, (12,))
        x = torch.stack([data[i:i + 64] for i in ix])
        y = torch.stack([data[i + 1:i + 65] for i in ix])
        loss = model(x, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - t0
    model.eval()

    def score(x):
        h = model.wte(x) + model.wpe(torch.arange(x.shape[1]))
        for b in model.blocks:
            h = b(h)
        return model.head(model.ln(h))

    return seconds, windows_bits(score, lut[torch.tensor(list(held))], 64) / len(held)


def ours(train: bytes, held: bytes, seconds: float, work: Path, extra: list[str]) -> tuple[float, float, float]:
    """prepare + ``train --time-budget``; returns (prepare s, train s, held-out bpb)."""
    corpus = work / "train.txt"
    corpus.write_bytes(train)
    gb = [sys.executable, "-m", "gasungbi"]
    t0 = time.perf_counter()
    subprocess.run(gb + ["prepare", "--corpus", str(corpus), "--out", str(work / "data")], check=True)
    t1 = time.perf_counter()
    subprocess.run(gb + ["train", "--data", str(work / "data"), "--out-dir", str(work / "run"),
                         "--time-budget", f"{seconds / 60:.4f}", "--no-progress", *extra], check=True)
    t2 = time.perf_counter()
    run = work / "run"
    final = run / (run / "latest").read_text().strip()
    model = gasungbi.load_model(final, dtype=torch.float32).eval()
    ids = load_tokenizer(final).encode(held.decode()).ids
    seq_len = json.loads((run / "config.json").read_text())["train"]["seq_len"]  # the context it trained on
    bits = windows_bits(lambda x: model(x), torch.tensor(ids), seq_len)
    return t1 - t0, t2 - t1, bits / len(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000, help="the reference's iterations")
    ap.add_argument("--ref-seconds", type=float, default=None, help="skip the reference: give gasungbi this time")
    ap.add_argument("--train-args", default="", help="extra `gasungbi train` flags, e.g. '--model cpu-tiny'")
    args = ap.parse_args()
    text = SHAKESPEARE.read_bytes()
    train, held = split(text)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"tiny Shakespeare: {len(train):,} training bytes, {len(held):,} held-out bytes")
    if args.ref_seconds is None:
        ref_s, ref_bpb = reference(train, held, args.iters)
        print(f"reference (nanoGPT CPU recipe, {args.iters} iterations): {ref_s:.1f} s, {ref_bpb:.3f} bits/byte")
    else:
        ref_s, ref_bpb = args.ref_seconds, float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        prep_s, train_s, bpb = ours(train, held, ref_s, Path(tmp), args.train_args.split())
    print(f"\n{'':12} {'train s':>8} {'bits/byte':>10}")
    print(f"{'reference':12} {ref_s:8.1f} {ref_bpb:10.3f}")
    print(f"{'gasungbi':12} {train_s:8.1f} {bpb:10.3f}   (+{prep_s:.1f} s prepare: tokenizer and shards)")
    print(f"ratio gasungbi / reference bits per byte: {bpb / ref_bpb:.3f} (goal <= 0.85); "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""FP8 vs FP32 training of cpu-tiny from the same seed, on the same batches.

Two copies of cpu-tiny start from identical weights; one gets ``apply_fp8`` (DeepSeek-V3's
block-scaled E4M3 GEMMs, emulated exactly on the CPU). Each step both train on the same batch of
tiny Shakespeare bytes (AdamW, warmup + cosine, next-token loss), alternating so that the machine's
load falls on both alike. Printed along the way: both losses (mean of the last 10 steps) and their
relative gap (DeepSeek-V3 reports < 0.25% at scale, Sec. 3.3 and Appendix B.1), and the step-time
ratio FP8 / FP32 (on a CPU the emulation is slower, not faster: it measures the emulation's cost).

    python benchmarks/fp8.py [--steps 300] [--batch 8] [--seq 128]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gasungbi.presets import get_preset
from gasungbi.model.transformer import build_model
from gasungbi.train.fp8 import apply_fp8
from gasungbi.train.optim import build_optimizers, lr_multiplier

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus() -> torch.Tensor:
    text = SHAKESPEARE.read_bytes() if SHAKESPEARE.exists() else Path(torch.__file__).read_bytes() * 50
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()  # byte ids < cpu-tiny's 4096


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = corpus()
    cfg = get_preset("cpu-tiny").replace(num_nextn_predict_layers=0)
    models = {"fp32": build_model(cfg, seed=0), "fp8": apply_fp8(build_model(cfg, seed=0))}
    opts = {k: build_optimizers(m, "adamw", args.lr)[0] for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    losses = {k: [] for k in models}
    secs = {k: 0.0 for k in models}
    print(f"cpu-tiny {sum(p.numel() for p in models['fp32'].parameters()) / 1e6:.1f}M, {args.steps} steps of "
          f"{args.batch}x{args.seq} tokens, {torch.get_num_threads()} threads")
    print(f"{'step':>5} {'fp32 loss':>10} {'fp8 loss':>10} {'rel gap':>8} {'time fp8/fp32':>14}")
    for step in range(args.steps):
        start = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=gen)
        idx = start[:, None] + torch.arange(args.seq + 1)
        x, y = data[idx[:, :-1]], data[idx[:, 1:]]
        mult = lr_multiplier((step + 1) / args.steps, warmup=20 / args.steps)
        for k, model in models.items():
            t = time.perf_counter()
            for g in opts[k].param_groups:
                g["lr"] = g["initial_lr"] * mult
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[k].step()
            secs[k] += time.perf_counter() - t
            losses[k].append(loss.item())
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            a, b = (sum(losses[k][-10:]) / len(losses[k][-10:]) for k in ("fp32", "fp8"))
            print(f"{step + 1:>5} {a:>10.4f} {b:>10.4f} {(b - a) / a:>+8.2%} {secs['fp8'] / secs['fp32']:>13.2f}x",
                  flush=True)
    print(f"step time: fp32 {secs['fp32'] / args.steps:.3f} s, fp8 {secs['fp8'] / args.steps:.3f} s "
          f"(ratio {secs['fp8'] / secs['fp32']:.2f}x, emulated FP8 on this CPU)")


if __name__ == "__main__":
    main()

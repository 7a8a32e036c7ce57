"""Expert parallelism against plain DDP on this machine: 2 CPU processes (gloo), same global batch.

    python benchmarks/ep_vs_ddp.py [--model debug] [--steps 200] [--batch 8] [--seq 64]

Runs ``torchrun --nproc_per_node=2 gasungbi train`` twice on tiny Shakespeare: DDP (every process
holds all routed experts) and ``--expert-parallel 2`` (each holds half; tokens travel to their
expert's process and back with two ``all_to_all_single`` per MoE layer, and again in the backward).
Reads tokens/s from each run's ``report.json`` (whole run, first step included) and the last
``metrics.jsonl`` row (the recent window), and prints them side by side. On CPU with gloo the
exchange is a memory copy through the loopback, so this measures the dispatcher's overhead, not
an interconnect; ``gasungbi plan train --expert-parallel K`` estimates that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def run(out: Path, data: Path, args: argparse.Namespace, *extra: str) -> dict:
    """One torchrun of ``gasungbi train``; returns its report plus the last metrics row's tokens/s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gasungbi",
           "train", "--data", str(data), "--out-dir", str(out), "--model", args.model, "--batch-size",
           str(args.batch), "--seq-len", str(args.seq), "--max-steps", str(args.steps), "--warmup-steps", "2",
           "--eval-interval", "0", "--eval-batches", "4", "--ckpt-interval", "0", "--log-interval", "5",
           "--no-progress", "--sample-tokens", "1", "--device", "cpu", "--overwrite", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report["window_tokens_per_s"] = next(r["tokens_per_s"] for r in reversed(rows) if "tokens_per_s" in r)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="debug", help="an MoE preset: debug or cpu-tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step, both processes together")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--out", default="runs/ep_vs_ddp")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        from gasungbi.data.prepare import prepare_corpus
        prepare_corpus(str(DATA), data, vocab_size=512, val_fraction=0.1, progress=False)

    results = {"DDP (2 processes)": run(out / "ddp", data, args),
               "EP 2 (2 processes)": run(out / "ep2", data, args, "--expert-parallel", "2")}
    print(f"{args.model}, {args.steps} steps of {args.batch} x {args.seq} tokens, 2 processes x {args.threads} "
          f"thread(s), gloo on CPU")
    print(f"{'run':<22}{'tokens/s (run)':>16}{'tokens/s (last window)':>24}{'elapsed s':>11}{'final loss':>12}")
    for name, r in results.items():
        print(f"{name:<22}{r['tokens_per_s']:>16,.0f}{r['window_tokens_per_s']:>24,.0f}{r['elapsed_s']:>11.1f}"
              f"{r['final_train_loss']:>12.4f}")
    ddp, ep = (r["tokens_per_s"] for r in results.values())
    print(f"EP 2 / DDP: {ep / ddp:.2f}x tokens/s over the whole run")


if __name__ == "__main__":
    main()

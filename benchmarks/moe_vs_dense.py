"""MoE+MLA against the dense Llama baseline at equal training FLOPs, on tiny Shakespeare.

    python benchmarks/moe_vs_dense.py [--budgets 10,20,40] [--out runs/moe_vs_dense]

For each budget B (in TFLOP of training compute, counted by ``training_flops_per_token``: 6 x
activated non-embedding parameters + attention, MTP included for the MoE model) both models
train a full run of their own (warmup + cosine schedule) for B / (FLOPs per token x tokens per
step) steps, then report validation bits per byte on the same held-out text. Data: the shared
``tinyshakespeare.txt``, a 2048-token byte-level BPE, the data pipeline's document-hash split.

Prints a table (bpb against FLOPs and wall-clock) and writes a PNG. The target: the MoE model
reaches the dense model's final (largest-budget) bits per byte with at most 0.6x its FLOPs; the
FLOPs the MoE model needs are interpolated on its bpb-against-log-FLOPs curve.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from gasungbi.presets import get_preset
from gasungbi.model.accounting import count_params, training_flops_per_token
from gasungbi.train.trainer import TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# Same width, depth, heads and vocabulary; the dense FFN matches the MoE's activated FFN.
MODELS = {
    "moe+mla (cpu-tiny)": dict(model="cpu-tiny", model_overrides={}),
    "dense llama (llama-cpu-tiny)": dict(model="llama-cpu-tiny", model_overrides={}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", default="8,16,32", help="training budgets in TFLOP, comma-separated")
    ap.add_argument("--out", default="runs/moe_vs_dense")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").exists():
        from gasungbi.data.prepare import prepare_corpus
        prepare_corpus(str(DATA), data, vocab_size=2048, val_fraction=0.1)
    from gasungbi.data.shards import load_manifest
    vocab = load_manifest(data).vocab_size

    budgets = [float(b) for b in args.budgets.split(",")]
    results = []
    for name, spec in MODELS.items():
        cfg = get_preset(spec["model"]).replace(vocab_size=vocab)
        fpt = training_flops_per_token(cfg, args.seq)
        for budget in budgets:
            steps = max(10, round(budget * 1e12 / (fpt * args.batch * args.seq)))
            run = out / f"{spec['model']}_{budget:g}"
            tc = TrainConfig(data=str(data), out_dir=str(run), model=spec["model"], batch_size=args.batch,
                             seq_len=args.seq, max_steps=steps, warmup_steps=max(5, steps // 20), lr=args.lr,
                             eval_interval=0, eval_batches=40, ckpt_interval=0, log_interval=10,
                             bias_update_speed=0.01, device="cpu", progress=False, sample_tokens=16,
                             sample_prompt="ROMEO:")
            report = train(tc) if not (run / "report.json").exists() else json.loads((run / "report.json").read_text())
            results.append({"model": name, "budget_tflop": budget, "steps": steps, "tokens": report["tokens"],
                            "flops": fpt * report["tokens"], "val_bpb": report["val_bpb"],
                            "train_s": report["elapsed_s"], "tokens_per_s": report["tokens_per_s"],
                            "params": count_params(cfg).total_with_mtp, "activated": count_params(cfg).activated})
            print(f"{name:<30} {budget:>6g} TFLOP  {steps:>5} steps  val bpb {report['val_bpb']:.4f}  "
                  f"{report['elapsed_s']:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    summarize(results, out)


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which a (flops, bpb) curve reaches ``target``, interpolating bpb in log-FLOPs."""
    points = sorted(points)
    for (f0, b0), (f1, b1) in zip(points, points[1:]):
        if b0 >= target >= b1 and b0 != b1:
            t = (b0 - target) / (b0 - b1)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    if points and points[0][1] <= target:
        return points[0][0]  # already there at the smallest budget: an upper bound
    return None


def summarize(results: list[dict], out: Path) -> None:
    names = list(dict.fromkeys(r["model"] for r in results))
    print(f"\n{'model':<30}{'TFLOP':>8}{'tokens':>11}{'train s':>9}{'tok/s':>8}{'val bpb':>9}")
    for r in results:
        print(f"{r['model']:<30}{r['flops'] / 1e12:>8.1f}{r['tokens']:>11,}{r['train_s']:>9.0f}"
              f"{r['tokens_per_s']:>8,.0f}{r['val_bpb']:>9.4f}")
    moe = [(r["flops"], r["val_bpb"]) for r in results if r["model"] == names[0]]
    dense = [(r["flops"], r["val_bpb"]) for r in results if r["model"] == names[1]]
    dense_final = max(dense)
    need = flops_to_reach(moe, dense_final[1])
    if need is None:
        print(f"\nMoE+MLA does not reach the dense model's final {dense_final[1]:.4f} bpb within the budgets run")
    else:
        ratio = need / dense_final[0]
        print(f"\nMoE+MLA reaches the dense model's final {dense_final[1]:.4f} bpb with {need / 1e12:.1f} TFLOP = "
              f"{ratio:.2f}x the dense model's {dense_final[0] / 1e12:.1f} TFLOP (target <= 0.60x): "
              f"{'met' if ratio <= 0.6 else 'not met'}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rs = [r for r in results if r["model"] == name]
        axes[0].plot([r["flops"] / 1e12 for r in rs], [r["val_bpb"] for r in rs], "o-", label=name)
        axes[1].plot([r["train_s"] / 60 for r in rs], [r["val_bpb"] for r in rs], "o-", label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("training TFLOP")
    axes[1].set_xlabel("training wall-clock (min, this CPU)")
    for ax in axes:
        ax.set_ylabel("validation bits per byte")
        ax.legend()
    fig.suptitle("tiny Shakespeare: MoE+MLA vs dense at equal training FLOPs")
    fig.tight_layout()
    fig.savefig(out / "moe_vs_dense.png", dpi=100)
    print(f"chart: {out / 'moe_vs_dense.png'}")


if __name__ == "__main__":
    main()

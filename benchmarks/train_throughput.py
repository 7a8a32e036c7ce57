"""Forward+backward training throughput: our Llama baseline and our MoE+MLA model against a plain
reference GPT written here (nanoGPT-style: learned positions, LayerNorm, GELU MLP, causal SDPA),
all at the ``cpu-tiny`` width, depth and vocabulary.

    python benchmarks/train_throughput.py [--batch 16] [--seq 256] [--rounds 5] [--warmup 2]
                                          [--threads N] [--clock wall|cpu]

The models are timed round-robin (one step each per round, after ``--warmup`` untimed rounds;
median over rounds) so that machine noise hits them alike; figures are printed side by side with
parameter and FLOP counts, then the two ratios the MoE is held to: its training tokens/s against
the dense model's (goal >= 0.95: routed experts cost no more per token than a dense MLP of their
activated width) and the dense model's against the reference (goal >= 1.0). The MoE also runs
with its multi-token prediction off (the same model; the MTP block and its second pass through the
output head are skipped), which separates what MTP costs from what the experts and MLA cost. The
reference GPT's MLP width is chosen to give it the same parameter count as our Llama.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.model.accounting import count_params, training_flops_per_token
from gasungbi.model.transformer import build_model
from gasungbi.presets import get_preset
from gasungbi.train.objective import Objective

REF, DENSE, MOE = "reference GPT", "ours: llama-cpu-tiny", "ours: cpu-tiny (MoE+MLA+MTP)"
NO_MTP = "ours: cpu-tiny, MTP off"


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)
        self.heads = heads

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    """The plain reference: ~60 lines, no MoE, no MLA, no RoPE."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int, ctx: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads, hidden) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, x, y):
        h = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for b in self.blocks:
            h = b(h)
        return {"loss": F.cross_entropy(self.head(self.ln(h)).flatten(0, 1), y.flatten())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time, which other work on a shared machine disturbs less "
                         "(with --threads 1 it is the compute time; more threads add their waits)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    moe_cfg = get_preset("cpu-tiny")
    llama_cfg = get_preset("llama-cpu-tiny")
    d, L, H, V = llama_cfg.hidden_size, llama_cfg.num_hidden_layers, llama_cfg.num_attention_heads, llama_cfg.vocab_size
    llama_params = count_params(llama_cfg).total
    # match the reference's parameters to our Llama's: 4 d^2 attention + 2 d h MLP per layer
    per_layer = (llama_params - 2 * V * d - args.seq * d) / L
    ref_hidden = int((per_layer - 4 * d * d) / (2 * d))
    ref = RefGPT(V, d, L, H, ref_hidden, args.seq)
    ref_params = sum(p.numel() for p in ref.parameters())
    ref_flops = 6 * (ref_params - V * d - args.seq * d) + 12 * L * d * args.seq  # PaLM convention

    models = {
        REF: (ref.train(), ref_params, ref_params, ref_flops),
        DENSE: (Objective(build_model(llama_cfg, seed=0).train()), llama_params, llama_params,
                training_flops_per_token(llama_cfg, args.seq)),
        MOE: (Objective(build_model(moe_cfg, seed=0).train()), count_params(moe_cfg).total_with_mtp,
              count_params(moe_cfg).activated, training_flops_per_token(moe_cfg, args.seq)),
        NO_MTP: (Objective(build_model(moe_cfg, seed=0).train(), mtp_weight=0.0), count_params(moe_cfg).total,
                 count_params(moe_cfg).activated, training_flops_per_token(moe_cfg, args.seq, include_mtp=False)),
    }
    x = torch.randint(0, V, (args.batch, args.seq))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.warmup + args.rounds):
        for name, (m, *_rest) in models.items():
            t = clock()
            m(x, x)["loss"].backward()
            m.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(clock() - t)

    tokens = args.batch * args.seq
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"fwd+bwd, batch {args.batch} x {args.seq}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, median of {args.rounds} round-robin rounds after {args.warmup} warm-up rounds")
    print(f"{'model':<30}{'params':>10}{'activated':>11}{'MFLOP/tok':>11}{'tokens/s':>10}{'vs ref':>8}{'GFLOP/s':>9}")
    for name, (_, total, active, flops) in models.items():
        print(f"{name:<30}{total / 1e6:>9.2f}M{active / 1e6:>10.2f}M{flops / 1e6:>11.1f}{tps[name]:>10,.0f}"
              f"{tps[name] / tps[REF]:>8.2f}{tps[name] * flops / 1e9:>9.1f}")
    print(f"MoE / dense tokens/s:             {tps[MOE] / tps[DENSE]:.2f}  (goal >= 0.95)")
    print(f"MoE, MTP off / dense tokens/s:    {tps[NO_MTP] / tps[DENSE]:.2f}")
    print(f"dense / reference tokens/s:       {tps[DENSE] / tps[REF]:.2f}  (goal >= 1.0)")


if __name__ == "__main__":
    main()

"""GRPO with LoRA and QLoRA beside full fine-tuning, on the R1-Distill-Qwen-1.5B shape: peak memory
and seconds per step.

A checkpoint of the ``r1-distill-qwen-1.5b`` preset's shape (1.78B parameters; ``--layers`` keeps the
first N of its 28 layers) with random weights is written once, in fp32, with a small tokenizer
(the model samples ids it does not have; they decode to nothing, which costs the timing nothing).
Each mode then runs ``gasungbi grpo`` in a process of its own, so that its peak resident memory
(``ru_maxrss``) is its own:

    full         AdamW on every weight (fp32 weights, gradients and two moments: 16 bytes a parameter)
    lora         LoRA r=16 on the attention and MLP projections, the fp32 base frozen
    qlora-int8   the same adapters on the base held in int8 (read and quantized one tensor at a time)
    qlora-int4   the same on int4

A step is P prompts x G completions: the rollouts, pi_old's log-probabilities, one update. Printed
per mode: trainable parameters, peak resident memory, resident memory after the steps, (on CUDA
the peak allocated), and seconds per step (the median of the steps after the first). A mode whose
predicted memory exceeds the memory available is skipped with a line naming both, rather than
started and killed.

    python benchmarks/lora.py [--layers 28] [--steps 3] [--modes full,lora,qlora-int8,qlora-int4]
                              [--device cpu] [--work /tmp/gasungbi-lora-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "lora", "qlora-int8", "qlora-int4")
RANK = 16
GiB = 2**30


def shape(layers: int):
    from gasungbi.presets import get_preset

    cfg = get_preset("r1-distill-qwen-1.5b")
    return cfg.replace(num_hidden_layers=layers) if layers != cfg.num_hidden_layers else cfg


def write_checkpoint(path: Path, layers: int) -> None:
    """The preset's shape with random weights (fp32) and a small tokenizer with gasungbi's chat template."""
    from gasungbi import build_model, save_model
    from gasungbi.data.conventions import CHAT_TEMPLATE, render_chat
    from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer
    from gasungbi.gym.tasks import make_split, render_task_prompt

    texts = [render_chat(render_task_prompt(t, True)) for t in make_split("arithmetic", 200, 2, seed=0, split="train")]
    save_tokenizer(train_tokenizer(texts, 400), path.parent / "tokenizer", chat_template=CHAT_TEMPLATE)
    save_model(build_model(shape(layers), seed=0), path, tokenizer=path.parent / "tokenizer")
    (path / "bench.json").write_text(json.dumps({"layers": layers}))


def predicted_bytes(layers: int, mode: str) -> float:
    """What a mode holds: the weights as held (fp32, int8 or int4 projections; embedding and norms
    fp32), gradients and AdamW's moments of what trains, and 2 GiB of activations and logits."""
    from gasungbi.model.accounting import count_params

    cfg = shape(layers)
    total = count_params(cfg).total_with_mtp
    embed = cfg.vocab_size * cfg.hidden_size
    per_weight = {"full": 16, "lora": 4, "qlora-int8": 1.1, "qlora-int4": 0.6}[mode]
    return (total - embed) * per_weight + embed * (16 if mode == "full" else 4) + 2 * GiB


def available_bytes(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return float("inf")


def run_mode(ckpt: Path, mode: str, args) -> dict:
    """One mode's GRPO steps in this process; its figures."""
    import torch

    from gasungbi.post.grpo import GRPO, GRPOConfig
    from gasungbi.train import distributed as dist
    from gasungbi.train import lora

    lora_fields = {} if mode == "full" else dict(lora_rank=RANK, lora_alpha=2 * RANK,
                                                quant=None if mode == "lora" else mode.split("-")[1])
    cfg = GRPOConfig(init_from=str(ckpt), out_dir=str(args.work / f"run-{mode}"), overwrite=True, steps=args.steps,
                     prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                     reward="format", eval_tasks=1, ckpt_interval=0, progress=False, device=args.device, lr=1e-5,
                     **lora_fields)
    cfg.validate()
    info = dist.setup(cfg.device)
    t = time.perf_counter()
    run = GRPO(cfg, info, t)
    load_s = time.perf_counter() - t
    seconds, step = [], run.step

    def timed(i: int) -> dict:
        t = time.perf_counter()
        row = step(i)
        seconds.append(time.perf_counter() - t)
        return row

    run.step = timed
    run.fit()
    statm = Path("/proc/self/statm")
    rss_now = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if statm.exists() else 0
    out = {"mode": mode, "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
           "load_s": load_s, "step_s": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "rss_after": rss_now}
    if info.device.type == "cuda":
        out["cuda_peak"] = torch.cuda.max_memory_allocated(info.device)
    if mode != "full":
        out["adapters"] = lora.describe(run.model)
    return out


def report(r: dict) -> str:
    steps = r["step_s"][1:] or r["step_s"]
    cuda = f", CUDA peak {r['cuda_peak'] / GiB:5.2f} GiB" if "cuda_peak" in r else ""
    return (f"{r['mode']:<11} {r['trainable'] / 1e6:8.2f}M trainable | peak RSS {r['peak_rss'] / GiB:5.2f} GiB, "
            f"after the steps {r['rss_after'] / GiB:5.2f} GiB{cuda} | {statistics.median(steps):6.1f} s/step "
            f"(steps: {', '.join(f'{s:.1f}' for s in r['step_s'])}) | load {r['load_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28, help="keep the first N of the 28 layers")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=1, help="P, prompts per step")
    ap.add_argument("--group", type=int, default=4, help="G, completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=16, help="longest completion")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gasungbi-lora-bench"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt = args.work / f"r1-distill-qwen-1.5b-{args.layers}L" / "model"
    if args.child == "write":
        return write_checkpoint(ckpt, args.layers)
    if args.child:
        print("RESULT " + json.dumps(run_mode(ckpt, args.child, args)), flush=True)
        return
    cfg = shape(args.layers)
    print(f"R1-Distill-Qwen-1.5B shape, {args.layers} of 28 layers ({cfg.hidden_size} wide, vocab {cfg.vocab_size}); "
          f"GRPO steps of {args.prompts} x {args.group} completions of up to {args.new_tokens} tokens on {args.device}, "
          f"{os.cpu_count()} CPUs, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    if not (ckpt / "bench.json").exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", "write", "--layers", str(args.layers),
                        "--work", str(args.work)], check=True)
        print(f"wrote the random-weight checkpoint {ckpt} in {time.perf_counter() - t:.0f} s")
    for mode in args.modes.split(","):
        need, have = predicted_bytes(args.layers, mode), available_bytes(args.device)
        if need > 0.9 * have:
            print(f"{mode:<11} skipped: needs about {need / GiB:.1f} GiB, {have / GiB:.1f} GiB available")
            continue
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode or result is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"{mode:<11} failed (exit {proc.returncode}): {' | '.join(tail)}")
            continue
        r = json.loads(result.removeprefix("RESULT "))
        print(report(r) + f" | predicted {need / GiB:.1f} GiB", flush=True)
        if "adapters" in r:
            print(f"{'':<11} {r['adapters']}")


if __name__ == "__main__":
    main()

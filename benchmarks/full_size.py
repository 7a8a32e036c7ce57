"""Full-size models on the memory of one machine: load with int8/int4 quantization, then decode.

    python benchmarks/full_size.py --dir /big/disk            # both models, every stage (~60 GB of disk)
    python benchmarks/full_size.py --models deepseek-v2-lite --quants int8 --batches 1   # a part

For each model (deepseek-v2-lite: 15.7B parameters, 27 layers, 64 routed experts top-6; and
r1-distill-qwen-7b: 7.6B, dense) it
  * writes a checkpoint of the model's shape in the Hugging Face layout (config.json + sharded
    safetensors + index, the names transformers reads), random bf16 weights N(0, 0.02), norms 1,
    one tensor at a time: the model is never built in memory; skipped, saying so, without the
    free disk it needs (its bf16 bytes + 2 GB);
  * loads it with ``--quant int8`` and ``int4`` in a child process each (``load_for_inference``:
    the memory check, then one tensor at a time from the files), printing the load seconds and the
    child's peak resident memory (ru_maxrss, imports included) beside the quantized weights' bytes
    (the goal: peak <= 1.2x);
  * decodes with each, batch 1 and batch 8, greedy (tokens/s timed as benchmarks/decode.py does:
    (N - 1) x batch / (time(N) - time(1)), best of 2), and prints at batch 1 the weight bytes one
    token reads x tokens/s as a share of the STREAM copy bandwidth measured in this run, and the
    planner's prediction for this machine (``gasungbi plan here``: ``plan.local.local_decode``);
  * llama.cpp beside it needs the GGUF of ``gasungbi export``, which builds the float32 model in
    memory: run only where that fits (``--llama-cpp``), else the line says so.

Stages are optional (``--no-write`` reuses a checkpoint in --dir, ``--no-load``, ``--batches``,
``--keep`` keeps the files; by default each checkpoint is deleted once measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import gasungbi
from gasungbi.config import ModelConfig, to_hf_config
from gasungbi.interop.hf import to_hf_state_dict, write_safetensors
from gasungbi.model.transformer import build_model

HERE = Path(__file__).resolve().parent
MODELS = ("deepseek-v2-lite", "r1-distill-qwen-7b")


def hf_tensor_specs(cfg: ModelConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (bf16, shape) of every tensor of ``cfg``'s checkpoint in Hugging Face names, from the
    model built on the meta device (no memory)."""
    sd = to_hf_state_dict(build_model(cfg, device="meta"))
    return {k: (torch.bfloat16, tuple(v.shape)) for k, v in sd.items()}


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    """A random bf16 weight: norms 1, biases and the router's correction bias 0, the rest N(0, std)."""
    if name.endswith(("norm.weight", "layernorm.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(("bias", "e_score_correction_bias")):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def write_random_checkpoint(cfg: ModelConfig, out: Path, shard_bytes: int = 2 * 2**30, seed: int = 0,
                            std: float = 0.02) -> Path:
    """``cfg``'s checkpoint with random bf16 weights (N(0, ``std``)), in the layout transformers writes (config.json,
    generation_config.json, ``model-0000i-of-0000n.safetensors`` of at most ``shard_bytes``, the
    index), made and written one tensor at a time."""
    out.mkdir(parents=True, exist_ok=True)
    specs = hf_tensor_specs(cfg)
    shards: list[dict] = [{}]
    size = 0
    for name, (dtype, shape) in specs.items():
        n = math.prod(shape) * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += n
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard, lambda k, _s=shard: random_tensor(k, _s[k][1], gen, std),
                          metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    total = sum(math.prod(s) * 2 for _, s in specs.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf = to_hf_config(cfg) | {"dtype": "bfloat16", "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}, indent=2) + "\n")
    return out


# The load and decode of one checkpoint at one precision, in a process of its own (its ru_maxrss is
# this load's peak). Prints one JSON line.
_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[5])
from decode import bytes_per_token, time_ours
from gasungbi.infer.load import load_for_inference
path, quant, batches, new_tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
out = {"rss_before_load": rss()}
t = time.perf_counter()
model = load_for_inference(path, "cpu", quant=quant, report=None)
out["load_s"] = time.perf_counter() - t
out["peak_rss_load"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seen, held = set(), 0
for p in list(model.parameters()) + list(model.buffers()):
    if p.data_ptr() not in seen:
        seen.add(p.data_ptr()); held += p.numel() * p.element_size()
out["weight_bytes"], out["bytes_per_token"] = held, bytes_per_token(model)
print(json.dumps(out), flush=True)
prompt = list(range(3, 3 + 16))
for b in batches:
    out[f"batch{b}_tokens_per_s"] = time_ours(model, [prompt] * b, new_tokens, False)
    print(json.dumps(out), flush=True)
if 1 in batches:  # for `gasungbi plan backtest --decode`, as `gasungbi generate --report` writes it
    import os, platform
    config = json.loads(open(os.path.join(path, "config.json")).read())
    report = {"kind": "gasungbi decode", "checkpoint": path, "config": config, "weights": quant, "device": "cpu",
              "threads": torch.get_num_threads(), "compile": False, "speculative": False, "batch_size": 1,
              "prompt_tokens": len(prompt), "new_tokens": new_tokens, "decode_tokens_per_s": out["batch1_tokens_per_s"],
              "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine()}}
    out["report"] = os.path.join(sys.argv[6], f"decode-{quant}.json")
    open(out["report"], "w").write(json.dumps(report, indent=1))
out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out), flush=True)
"""


def run_child(path: Path, quant: str, batches: list[int], new_tokens: int, timeout: float) -> dict:
    """Load (and decode with) ``path`` at ``quant`` in a child process; its last JSON line, or
    {"error": ...} with the tail of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path), quant, json.dumps(batches), str(new_tokens),
                            str(HERE), str(path.parent)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = [ln for ln in lines.splitlines() if ln.startswith("{")]
        return {**(json.loads(last[-1]) if last else {}), "error": f"timed out after {timeout:.0f} s"}
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(last[-1]) if last else {}
    if r.returncode != 0:
        out["error"] = f"exit {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-2:])
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def measure_one(name: str, args, bw: float, flops: float) -> None:
    from gasungbi.plan.local import local_decode

    cfg = gasungbi.get_preset(name).replace(num_nextn_predict_layers=0)
    path = Path(args.dir) / name
    bf16_bytes = sum(math.prod(s) * 2 for _, s in hf_tensor_specs(cfg).values())
    n_params = bf16_bytes // 2
    print(f"\n{name}: {n_params / 1e9:.2f}B parameters, {gb(bf16_bytes)} in bf16 on disk")
    if args.write or not path.exists():
        free = shutil.disk_usage(Path(args.dir)).free
        if free < bf16_bytes + 2e9:
            print(f"  skipped: writing it needs {gb(bf16_bytes + 2e9)} of free disk in {args.dir}, which has {gb(free)}")
            return
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        write_random_checkpoint(cfg, path)
        print(f"  wrote random bf16 weights one tensor at a time in {time.perf_counter() - t:.0f} s")
    try:
        if args.load:
            for quant in args.quants:
                r = run_child(path, quant, args.batches, args.new_tokens, args.timeout)
                report(quant, r, cfg, bw, flops, local_decode)
        print(f"  llama.cpp: {llama_cpp_line(bf16_bytes)}")
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def report(quant: str, r: dict, cfg: ModelConfig, bw: float, flops: float, local_decode) -> None:
    if "load_s" in r:
        w, peak = r["weight_bytes"], r["peak_rss_load"]
        before = r["rss_before_load"]
        print(f"  {quant}: load {r['load_s']:.0f} s, peak RSS {gb(peak)} = {peak / w:.2f}x the quantized weights "
              f"({gb(w)}; goal <= 1.2x); {(peak - before) / w:.2f}x above the {gb(before)} resident before loading")
    for key in sorted(k for k in r if k.startswith("batch")):
        b = int(key.removeprefix("batch").split("_")[0])
        tps, line = r[key], f"    batch {b}: {r[key]:.2f} tokens/s"
        if b == 1:
            read = r["bytes_per_token"] * tps
            pred = local_decode(cfg, bw, flops, quant, 16 + 8)["predicted_tokens_per_s"]
            line += (f", weight reads {read / 1e9:.1f} GB/s = {read / bw:.0%} of STREAM ({r['bytes_per_token'] / 1e9:.2f} "
                     f"GB/token); plan here predicts {pred:.2f} tokens/s ({tps / pred - 1:+.0%} measured vs predicted)")
        print(line)
    if "report" in r:
        from gasungbi.plan.backtest import run_backtest
        from gasungbi.plan.catalog import load_catalog

        try:
            row = run_backtest(load_catalog(), decode=r["report"]).rows[-1]
        except ValueError as e:
            print(f"    backtest row: not made ({e})")
        else:
            print(f"    backtest row \"{row.name}\": measured {row.published:.2f}, predicted {row.predicted:.2f} "
                  f"tokens/s ({row.error:+.0%}; {row.efficiency:.0%} of the ceiling)")
    if "peak_rss" in r:
        print(f"    peak RSS over load and decode {gb(r['peak_rss'])}")
    if "error" in r:
        print(f"  {quant}: FAILED ({r['error']})")


def llama_cpp_line(bf16_bytes: int) -> str:
    """What can be said of llama.cpp on this model here."""
    from gasungbi.infer.memory import available_bytes

    have, _ = available_bytes("cpu")
    need = bf16_bytes * 2
    return (f"not run: `gasungbi export` to Q8_0/Q4_0 builds the float32 model in memory ({gb(need)}), "
            f"more than the {gb(have or 0)} available")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/gasungbi-full-size", help="where the checkpoints are written")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--quants", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8], help="decode batch sizes (none: load only)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child (load + decode)")
    ap.add_argument("--no-write", dest="write", action="store_false", help="reuse the checkpoint already in --dir")
    ap.add_argument("--no-load", dest="load", action="store_false", help="only write the checkpoints")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete each once measured)")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    from gasungbi.plan.measure import measure_matmul_flops, measure_memory_bandwidth

    runs = sorted(measure_memory_bandwidth(512) for _ in range(3))
    bw, flops = runs[1], measure_matmul_flops(torch.float32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"memory available {gb(gasungbi_available())}, disk free in {args.dir} {gb(shutil.disk_usage(args.dir).free)}")
    print(f"memory bandwidth (STREAM copy of 512 MB, median of 3 best-of-5: {', '.join(f'{r / 1e9:.1f}' for r in runs)}): "
          f"{bw / 1e9:.1f} GB/s; matmul {flops / 1e9:.0f} GFLOP/s fp32")
    for name in args.models:
        measure_one(name, args, bw, flops)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


def gasungbi_available() -> int:
    from gasungbi.infer.memory import available_bytes

    return available_bytes("cpu")[0] or 0


if __name__ == "__main__":
    main()

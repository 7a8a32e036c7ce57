"""Decode speed of gasungbi's engine beside llama.cpp, on a 100.8M DeepseekV3 written by transformers, and what it reads.

    python benchmarks/decode.py                 # all sections (about 10 minutes on 2 cores)
    python benchmarks/decode.py --no-big        # skip the 1.7B-parameter bandwidth section

What it prints, every figure measured in this run (ratios are within the run: timings on a shared
2-core machine move by +-30% between runs):
  * the machine's memory bandwidth, STREAM "copy" style (b[:] = a over 2 x 512 MiB; bytes read +
    written / time; the median of three best-of-five runs);
  * batch-1 decode tokens/s on that checkpoint (100.8M-total / 23M-active DeepseekV3
    built and written by transformers: hidden 512, 8 layers, the first dense, 32 routed experts
    top-4 + 1 shared, q_lora 256, kv_lora 128, vocab 1024): llama.cpp (llama-cpp-python on the
    GGUF of `gasungbi export`: f32 and Q8_0) beside ours in fp32 and int8, eager and with the
    step compiled. Each is timed as (N - 1) tokens / (time(N tokens) - time(1 token)), greedy,
    the best of ``--rounds`` rounds that alternate the engines;
  * batch 16 beside batch 1, sampling at temperature 1 (what GRPO rollouts run), ours;
  * int8 bandwidth on a bandwidth-bound model (deepseek-v2-lite's shape with 3 layers: 1.7B total
    parameters, vocab 102400): weight bytes one token reads x tokens/s, as a share of STREAM;
  * with --ppl: a small byte-level model's perplexity in fp32, int8 and int4;
  * on a CUDA machine (unless --no-cuda): the checkpoint in bf16 on the GPU, batch 1 and 16, eager
    beside the step compiled with CUDA graphs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import gasungbi
from gasungbi.eval.perplexity import perplexity
from gasungbi.infer import native
from gasungbi.infer.decode import decode_steps
from gasungbi.infer.quant_modules import QuantExperts, quantize
from gasungbi.infer.sampling import GREEDY, SamplingParams
from gasungbi.model.moe import Experts

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
REFERENCE_SHAPE = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1,
                   intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
                   num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=256, q_lora_rank=256,
                   kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=1,
                   topk_group=1, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1)


def build_reference_checkpoint(out: Path) -> Path:
    """The reference DeepseekV3, random weights (seed 0), built and saved by transformers."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**REFERENCE_SHAPE)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    return out


def stream_copy_gbs(mib: int = 512, repeats: int = 5) -> float:
    """STREAM copy bandwidth in GB/s: (read + write bytes) / best time."""
    a = torch.rand(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads at batch 1 (routed experts at K of E; no embedding/MTP)."""
    cfg = model.config
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    total, seen = 0.0, set()
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(("model.mtp", "model.embed_tokens")):
            continue
        scale = frac if isinstance(mod, (Experts, QuantExperts)) else 1.0
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.data_ptr() in seen or t.dtype == torch.bool:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size() * scale
    return int(total)


def time_ours(model, prompts, n: int, compile: bool, sampling: SamplingParams = GREEDY) -> float:
    """Decode tokens/s: (N - 1) x batch tokens / (time(N tokens) - time(1 token))."""
    def run(k: int) -> float:
        t = time.perf_counter()
        for _ in decode_steps(model, prompts, k, sampling, compile=compile):
            pass
        return time.perf_counter() - t

    run(n)  # warm up (and compile every window the run uses)
    return len(prompts) * (n - 1) / min(run(n) - run(1) for _ in range(2))


def time_llama_cpp(gguf: Path, prompt: list[int], n: int, threads: int) -> float:
    """llama.cpp's decode tokens/s on ``gguf`` (llama-cpp-python), batch 1, greedy, timed as ours:
    (N - 1) tokens / (time(N tokens) - time(1 token)); its default KV cache (f16)."""
    from gasungbi.interop.gguf import open_in_llama_cpp

    llm, off = open_in_llama_cpp(gguf, n_ctx=len(prompt) + n + 8, n_threads=threads, n_threads_batch=threads,
                                 verbose=False)
    if off:
        print(f"  (llama.cpp on {gguf.name}: AMX and repacked weight buffers off, as --no-repack; "
              "they crash on this CPU)")

    def run(k: int) -> float:
        t = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), 1):
            if i == k:
                break
        return time.perf_counter() - t

    try:
        run(4)  # warm up
        return (n - 1) / min(run(n) - run(1) for _ in range(2))
    finally:
        llm.close()


def with_tokenizer(path: str | Path, out: Path) -> Path:
    """``path`` with a byte-level BPE tokenizer added when it has none (GGUF files carry one; its ids
    beyond the tokenizer's are written as unused tokens, so the decode work is the model's)."""
    if (Path(path) / "tokenizer.json").exists():
        return Path(path)
    import shutil
    import sysconfig

    from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for f in Path(path).iterdir():
        shutil.copy(f, out / f.name)
    docs = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]]
    save_tokenizer(train_tokenizer(docs, 1024), out)
    return out


def reference_section(args, bw: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else build_reference_checkpoint(Path(tmp) / "reference")
        base = gasungbi.load_model(path, dtype=torch.float32)
        cfg = base.config
        n_params = sum(p.numel() for p in base.parameters()) - sum(p.numel() for p in base.model.mtp.parameters())
        print(f"\nmodel: {args.checkpoint or 'the 100.8M DeepseekV3 written by transformers'}, "
              f"{n_params / 1e6:.1f}M parameters; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens")
        prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        ckpt = with_tokenizer(path, Path(tmp) / "with-tokenizer")
        from gasungbi.interop.gguf import export_gguf

        rows = []
        for mode, kind in (("fp32", "f32"), ("int8", "q8_0")):
            model = base if mode == "fp32" else quantize(base, mode, 128)
            gguf = export_gguf(ckpt, Path(tmp) / f"model-{kind}.gguf", kind)
            best = {"llama": 0.0, "eager": 0.0, "compiled": 0.0}
            for _ in range(args.rounds):  # alternate the engines: drifts in machine speed hit all alike
                best["llama"] = max(best["llama"], time_llama_cpp(gguf, prompt, args.new_tokens, torch.get_num_threads()))
                best["eager"] = max(best["eager"], time_ours(model, [prompt], args.new_tokens, False))
                best["compiled"] = max(best["compiled"], time_ours(model, [prompt], args.new_tokens, True))
            rows.append((mode, kind, best, bytes_per_token(model)))
        print(f"\nbatch 1, greedy, best of {args.rounds} alternating rounds:")
        print(f"{'ours':5} {'eager':>8} {'compiled':>9}   {'llama.cpp':9} {'tok/s':>7}   {'eager/llama':>11} "
              f"{'compiled/llama':>14} {'GB/s':>6} {'of STREAM':>9}")
        for mode, kind, b, bpt in rows:
            gbs = bpt * b["compiled"] / 1e9
            print(f"{mode:5} {b['eager']:8.1f} {b['compiled']:9.1f}   {kind:9} {b['llama']:7.1f}   "
                  f"{b['eager'] / b['llama']:10.2f}x {b['compiled'] / b['llama']:13.2f}x {gbs:6.1f} {gbs / bw:8.0%}")

        print("\nbatch 16 beside batch 1, sampling at temperature 1 (GRPO rollouts), fp32, compiled step:")
        hot = SamplingParams(temperature=1.0, seed=0)
        for b in (1, 16):
            prompts = [prompt] * b
            print(f"  batch {b:2d}: {time_ours(base, prompts, args.new_tokens, True, hot):8.1f} tok/s (all rows)")


def big_section(args, bw: float) -> None:
    """int8 weight reads on a bandwidth-bound model: deepseek-v2-lite's shape, 3 layers."""
    cfg = gasungbi.ModelConfig(vocab_size=102400, hidden_size=2048, num_hidden_layers=3, first_k_dense_replace=1,
                               intermediate_size=10944, num_attention_heads=16, n_routed_experts=64,
                               num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
                               q_lora_rank=0, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                               v_head_dim=128, num_nextn_predict_layers=0, max_position_embeddings=4096,
                               scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)
    float_model = gasungbi.build_model(cfg, seed=0)
    n_total = sum(p.numel() for p in float_model.parameters())
    model = quantize(float_model, "int8", 128)
    del float_model
    bpt = bytes_per_token(model)
    prompt = list(range(3, 3 + args.prompt_len))
    tps = {c: time_ours(model, [prompt], 32, c) for c in (False, True)}
    print(f"\nbandwidth: deepseek-v2-lite shape, 3 layers, {n_total / 1e9:.2f}B parameters in int8, "
          f"{bpt / 1e6:.0f} MB of weights per token (routed experts at 6 of 64)")
    for c, t in tps.items():
        gbs = bpt * t / 1e9
        print(f"  {'compiled' if c else 'eager':8} {t:6.1f} tok/s  {gbs:5.1f} GB/s = {gbs / bw:4.0%} of STREAM "
              f"({bw:.1f} GB/s)")


def cuda_section(args) -> None:
    """On a CUDA machine: the reference checkpoint in bf16 on the GPU, batch 1 and 16, eager beside
    the compiled step (``mode="reduce-overhead"``: the step replayed as a CUDA graph)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.checkpoint) if args.checkpoint else build_reference_checkpoint(Path(tmp) / "reference")
        model = gasungbi.load_model(path, dtype=torch.bfloat16).to("cuda").eval()
        prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        print(f"\nCUDA ({torch.cuda.get_device_name()}), bf16, greedy, best of {args.rounds} rounds:")
        for b in (1, 16):
            tps = {c: max(time_ours(model, [prompt] * b, args.new_tokens, c) for _ in range(args.rounds))
                   for c in (False, True)}
            print(f"  batch {b:2d}: eager {tps[False]:8.1f} tok/s, compiled (CUDA graphs) {tps[True]:8.1f} tok/s "
                  f"({tps[True] / tps[False]:.2f}x)")


def ppl_section(steps: int, seed: int = 0) -> None:
    if SHAKESPEARE.exists():
        text, source = SHAKESPEARE.read_bytes(), "tiny Shakespeare"
    else:
        import inspect
        import json as mod
        text, source = inspect.getsource(mod).encode() * 4, "the json package source"
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:][: 64 * 257]
    cfg = gasungbi.get_preset("cpu-tiny").replace(vocab_size=512, max_position_embeddings=512)
    model = gasungbi.build_model(cfg, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, train.numel() - 129, (16,), generator=g)
        batch = torch.stack([train[s:s + 129] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    print(f"\nperplexity: cpu-tiny shape, byte vocabulary, {steps} AdamW steps on {source} "
          f"({time.perf_counter() - t0:.0f} s), {val.numel() - 1:,} validation bytes")
    base = perplexity(model, val, 256)
    print(f"  fp32  {base:8.4f}")
    for mode, target in (("int8", 1.0), ("int4", 5.0)):
        p = perplexity(quantize(model, mode, 128), val, 256)
        change = (p / base - 1) * 100
        print(f"  {mode}  {p:8.4f}  {change:+6.2f}%  (target within +{target:.0f}%: "
              f"{'met' if change <= target else 'NOT met'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint instead of the reference one")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-big", dest="big", action="store_false", help="skip the 1.7B-parameter bandwidth section")
    ap.add_argument("--ppl", action="store_true", help="also the quantized perplexity section")
    ap.add_argument("--no-cuda", dest="cuda", action="store_false", help="skip the GPU section on a CUDA machine")
    ap.add_argument("--ppl-steps", type=int, default=300)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}; "
          f"native kernels: {'yes' if native.available() else 'NO'}"
          f"{', int8 with Q8 activations (VNNI)' if native.available() and native.q8_activations() else ''}")
    runs = sorted(stream_copy_gbs() for _ in range(3))
    bw = runs[1]
    print(f"memory bandwidth (STREAM copy, 2 x 512 MiB, median of 3 best-of-5 runs: "
          f"{', '.join(f'{r:.1f}' for r in runs)}): {bw:.1f} GB/s")
    reference_section(args, bw)
    if args.big:
        big_section(args, bw)
    if args.cuda and torch.cuda.is_available():
        cuda_section(args)
    if args.ppl:
        ppl_section(args.ppl_steps)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Decode speed of gasungbi's engine against transformers' ``generate``, in fp32, int8 and int4.

    python benchmarks/decode.py                      # the `small` preset (~130M + MTP), random weights
    python benchmarks/decode.py --new-tokens 16 --no-ppl --batches 1   # quicker

What it prints:
  * the machine's memory bandwidth, STREAM "copy" style (b[:] = a over 2 x 512 MiB; bytes read +
    written / time; the median of three best-of-five runs, as single runs here range 45-80 GB/s);
  * decode tokens/s at batch 1 and 8 for our engine (fp32, int8, int4) and for transformers
    (fp32, the same checkpoint written by ``save_model``), both timed the same way: wall time of
    generating N tokens minus that of generating 1 (the prefill), greedy, no stop token;
  * at batch 1, the bandwidth achieved: bytes of weights one token reads (everything but the
    embedding and the MTP block, routed experts x K/E) x tokens/s, as a share of the measured one;
  * the ceiling the kernels themselves set: one step's weight matmuls run back to back with nothing
    else (same kernels and casts, weights streamed from memory in the same order), and the share of
    that speed the engine reaches. On this 2-core EPYC the int8 kernel alone reads ~20 GB/s at
    these matrix sizes (128-512 KiB per expert matrix; 28% of STREAM at 75 GB/s, 44% at 46 GB/s,
    both seen here on different hours), and at most ~37 GB/s on one large cold matrix: the 50%
    bandwidth target cannot be met with PyTorch's stock kernels here, whatever the engine does;
  * with --ppl (default on): a small byte-level model trained for a few hundred steps on tiny
    Shakespeare (or on the standard library's source when that file is absent), and its
    validation perplexity in fp32, int8 and int4.

Targets from the issue: >= 3x transformers at batch 1; int8 >= 1.5x our fp32; int8 >= 50% of the
measured bandwidth; perplexity int8 within +1%, int4 within +5%. The figures are what this
machine gives, under whatever else runs on it (the load average is printed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import gasungbi
from gasungbi.infer.generate import generate
from gasungbi.infer.quant import QuantExperts, QuantLinear, QuantMLP, _swiglu, perplexity, quantize
from gasungbi.model.layers import MLP
from gasungbi.model.moe import Experts

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"


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


def matmul_steps(model) -> tuple[list, int]:
    """The weight matmuls of one batch-1 decode step, as (callable, input) pairs, and the weight
    bytes they read: every projection but ``kv_b_proj`` (read by the absorbed attention as a
    tensor), the dense/shared FFNs, the first K experts of each MoE layer, the output head."""
    cfg, calls, total = model.config, [], 0
    mlps = {name for name, mod in model.named_modules() if isinstance(mod, MLP)}
    k, d = cfg.num_experts_per_tok, cfg.hidden_size
    for name, mod in model.named_modules():
        if (name.startswith(("model.mtp", "model.embed_tokens")) or name.endswith("kv_b_proj")
                or name.rpartition(".")[0] in mlps):  # an MLP's projections run as the MLP
            continue
        if isinstance(mod, (torch.nn.Linear, QuantLinear)):
            calls.append((mod, torch.randn(1, mod.in_features)))
        elif isinstance(mod, (MLP, QuantMLP)):
            calls.append((mod, torch.randn(1, d)))
        elif isinstance(mod, Experts):
            calls += [(partial(mod.expert, e), torch.randn(1, d)) for e in range(k)]
        elif isinstance(mod, QuantExperts):  # as the engine runs them: bf16 in, bf16 between
            calls += [(partial(_swiglu, mod.gate_up[e], mod.down[e]), torch.randn(1, d).to(torch.bfloat16))
                      for e in range(k)]
        else:
            continue
        scale = k / cfg.n_routed_experts if isinstance(mod, (Experts, QuantExperts)) else 1.0
        total += scale * sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())
                             if t.dim() >= 1)
    return calls, int(total)


def time_matmuls(model, repeats: int = 50) -> tuple[float, int]:
    """Steps/s of a decode step that would be nothing but its weight matmuls (same kernels and
    activation casts, random inputs, weights cycled through memory in the same order), and bytes."""
    calls, nbytes = matmul_steps(model)

    def step():
        for f, x in calls:
            f(x)

    with torch.inference_mode():
        for _ in range(5):
            step()
        t = time.perf_counter()
        for _ in range(repeats):
            step()
    return repeats / (time.perf_counter() - t), nbytes


def time_ours(model, prompts, n: int) -> float:
    """Decode tokens/s: (N - 1) x batch tokens / (time(N tokens) - time(1 token))."""
    generate(model, prompts, max_new_tokens=4, stop_tokens=())  # warm up
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        generate(model, prompts, max_new_tokens=1, stop_tokens=())
        t1 = time.perf_counter()
        generate(model, prompts, max_new_tokens=n, stop_tokens=())
        t2 = time.perf_counter()
        best = min(best, (t2 - t1) - (t1 - t))
    return len(prompts) * (n - 1) / best


def time_hf(hf, prompts, n: int) -> float:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            t2 = time.perf_counter()
            assert out.shape[1] == ids.shape[1] + n
            best = min(best, (t2 - t1) - (t1 - t))
    return len(prompts) * (n - 1) / best


def time_llama_cpp(gguf: Path, prompt: list[int], n: int, threads: int) -> float:
    """llama.cpp's decode tokens/s on ``gguf`` (llama-cpp-python), batch 1, greedy, timed as ours:
    (N - 1) tokens / (time(N tokens) - time(1 token)); its default KV cache (f16)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(prompt) + n + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

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
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    ap.add_argument("--checkpoint", default=None, help="an existing checkpoint instead of random weights")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--modes", default="fp32,int8,int4")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--no-ppl", dest="ppl", action="store_false")
    ap.add_argument("--ppl-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                    help="skip llama.cpp on the exported GGUF (f32 beside our fp32, q8_0 beside our int8)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.2f}")
    runs = sorted(stream_copy_gbs() for _ in range(3))
    bw = runs[1]
    print(f"memory bandwidth (STREAM copy, 2 x 512 MiB, median of 3 best-of-5 runs: "
          f"{', '.join(f'{r:.1f}' for r in runs)}): {bw:.1f} GB/s")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            cfg = gasungbi.get_preset(args.preset)
            if args.vocab:
                cfg = cfg.replace(vocab_size=args.vocab)
            path = gasungbi.save_model(gasungbi.build_model(cfg, seed=0), tmp)
        base = gasungbi.load_model(path, dtype=torch.float32)
        cfg = base.config
        n_params = sum(p.numel() for p in base.parameters())
        print(f"model: {args.checkpoint or args.preset}, {n_params / 1e6:.1f}M parameters "
              f"({cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}, "
              f"vocab {cfg.vocab_size}); prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist() for b in batches}
        hf_tps = {}
        if not args.no_hf:
            import transformers
            transformers.logging.set_verbosity_error()  # the MTP block is reported as unused
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for b in batches:
                hf_tps[b] = time_hf(hf, prompts[b], args.new_tokens)
            del hf
        llama_tps = {}
        if args.llama_cpp:  # the field's CPU engine on the same weights, exported by gasungbi export
            from gasungbi.interop.gguf import export_gguf
            ckpt = with_tokenizer(path, Path(tmp) / "with-tokenizer")
            for mode, gguf_type in (("fp32", "f32"), ("int8", "q8_0")):
                if mode in modes:
                    gguf = export_gguf(ckpt, Path(tmp) / f"model-{gguf_type}.gguf", gguf_type)
                    llama_tps[mode] = time_llama_cpp(gguf, prompts[1][0] if 1 in prompts else prompts[batches[0]][0],
                                                     args.new_tokens, torch.get_num_threads())
        rows, ours, alone = [], {}, {}
        for mode in modes:
            model = base if mode == "fp32" else quantize(base, mode, 128)
            bpt = bytes_per_token(model)
            alone[mode] = time_matmuls(model)
            for b in batches:
                tps = time_ours(model, prompts[b], args.new_tokens)
                ours[mode, b] = tps
                rows.append((mode, b, tps, bpt))
            if mode != "fp32":
                del model

    print(f"\n{'mode':5} {'batch':>5} {'ours tok/s':>11} {'transformers':>13} {'vs HF':>7} {'vs our fp32':>11} "
          f"{'MB/token':>9} {'GB/s':>6} {'of STREAM':>9}")
    for mode, b, tps, bpt in rows:
        hf_b = hf_tps.get(b)
        vs_hf = f"{tps / hf_b:6.2f}x" if hf_b else "-"
        vs_fp = f"{tps / ours['fp32', b]:10.2f}x" if ("fp32", b) in ours else "-"
        if b == 1:
            gbs = bpt * tps / 1e9
            bw_cols = f"{bpt / 1e6:9.1f} {gbs:6.1f} {gbs / bw:8.0%}"
        else:
            bw_cols = f"{'':9} {'':6} {'':9}"
        print(f"{mode:5} {b:5d} {tps:11.1f} {hf_b if hf_b else float('nan'):13.1f} {vs_hf:>7} {vs_fp:>11} {bw_cols}")
    print("transformers: fp32, the same checkpoint, model.generate(do_sample=False); "
          f"load average now {os.getloadavg()[0]:.2f}")
    if llama_tps:
        print(f"\nbatch 1 beside llama.cpp (llama-cpp-python, the GGUF of `gasungbi export`, "
              f"{torch.get_num_threads()} threads):")
        print(f"{'ours':5} {'tok/s':>8}   {'llama.cpp':12} {'tok/s':>8} {'ours / llama.cpp':>17}")
        for mode, tps in llama_tps.items():
            kind = {"fp32": "f32", "int8": "q8_0"}[mode]
            print(f"{mode:5} {ours[mode, 1]:8.1f}   {kind:12} {tps:8.1f} {ours[mode, 1] / tps:16.2f}x")
    print("\nthe weight matmuls of one batch-1 step alone (same kernels and casts; no attention, router, "
          "norms or Python between them): the ceiling these kernels set")
    print(f"{'mode':5} {'steps/s':>8} {'MB/step':>8} {'GB/s':>6} {'of STREAM':>9} {'engine at':>10}")
    for mode, (sps, nbytes) in alone.items():
        engine = f"{ours[mode, 1] / sps:9.0%}" if (mode, 1) in ours else "-"
        print(f"{mode:5} {sps:8.1f} {nbytes / 1e6:8.1f} {nbytes * sps / 1e9:6.1f} {nbytes * sps / 1e9 / bw:8.0%} "
              f"{engine:>10}")
    if args.ppl:
        ppl_section(args.ppl_steps)


if __name__ == "__main__":
    main()

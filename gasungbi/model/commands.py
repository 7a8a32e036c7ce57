"""CLI: ``gasungbi info`` (this machine and the installed versions) and ``gasungbi params``."""

from __future__ import annotations

import json as json_lib

from gasungbi.flags import Model


def _cpu_has_bf16() -> bool:
    """Whether this CPU has BF16 matmul instructions (AVX512-BF16 or AMX). torch's capability string
    says only AVX512 on such CPUs, so ask torch's own probes (private; absent = no)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def info(json: bool = False) -> int:
    """Versions, device, CPU capability and threads.

    Args:
        json: print JSON instead of a table
    """
    import platform

    import torch

    import gasungbi

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "not installed (pip install 'gasungbi[hf]')"
    cuda = torch.cuda.is_available()
    capability = torch.backends.cpu.get_cpu_capability()
    rows = {
        "gasungbi": gasungbi.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)",
        "cuda devices": torch.cuda.device_count() if cuda else 0,
        "cpu capability": capability,
        "cpu threads": torch.get_num_threads(),
        "bf16 on cpu": "fast (AVX512-BF16/AMX): --precision bf16 may train faster" if _cpu_has_bf16()
                       else "slow: train in fp32 on this CPU",
    }
    if json:
        print(json_lib.dumps(rows, indent=2))
    else:
        width = max(map(len, rows))
        for k, v in rows.items():
            print(f"{k:<{width}}  {v}")
    return 0


def params(model: Model, json: bool = False) -> int:
    """Parameter accounting (total and activated, by component) of a preset or checkpoint; the model is
    also built on the meta device (no memory) to check the formula against the real module tree.

    Args:
        model: a preset name (debug, cpu-tiny, small, deepseek-v3-671b, ...) or a checkpoint directory
        json: print JSON
    """
    from gasungbi.presets import resolve_model_config
    from gasungbi.model.accounting import count_params, format_params
    from gasungbi.model.transformer import build_model

    cfg = resolve_model_config(model)
    meta = build_model(cfg, device="meta")
    built = sum(p.numel() for p in meta.parameters())
    pc = count_params(cfg)
    fp8 = _fp8_bytes(meta)
    if json:
        print(json_lib.dumps({"model": model, "components": pc.components, "mtp": pc.mtp, "total": pc.total,
                              "activated": pc.activated, "total_with_mtp": pc.total_with_mtp,
                              "built_on_meta": built, "bf16_bytes": 2 * built, "fp8_bytes": fp8}, indent=2))
        return 0
    print(f"{model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})" if cfg.is_mla or cfg.is_v4 else
          f"{model}: dense {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}")
    print(format_params(cfg))
    print(f"built on the meta device: {built:,} parameters (formula: {pc.total_with_mtp:,})")
    gb = 1e9 if built > 5e8 else 1e6
    unit = "GB" if gb == 1e9 else "MB"
    print(f"weights: {2 * built / gb:,.2f} {unit} in bf16; {fp8 / gb:,.2f} {unit} in DeepSeek FP8 (projections and "
          f"experts E4M3 with a float32 scale per 128x128 block, the rest bf16)")
    return 0


def _fp8_bytes(model) -> int:
    """Bytes of ``model``'s weights in DeepSeek's FP8 checkpoint format (``gasungbi.interop.fp8``):
    every attention/FFN projection (routed experts one by one) at 1 byte an element plus 4 per
    128x128 block, everything else (embedding, head, router, norms, MTP's eh_proj) at 2. For
    deepseek-v3-671b: 684.9 GB; the released files hold 688.6 GB, the difference being MTP's copies
    of the embedding and head."""
    import re

    proj = re.compile(r"(_proj|_proj_with_mqa)(\.weight)?$")
    total = 0
    for name, p in model.named_parameters():
        if proj.search(name) and "eh_proj" not in name and p.dim() >= 2:
            rows, cols = p.shape[-2:]
            total += (p.numel() // (rows * cols)) * (rows * cols + 4 * -(-rows // 128) * -(-cols // 128))
        else:
            total += 2 * p.numel()
    return total

"""CLI: ``gasungbi info`` (this machine and the installed versions) and ``gasungbi params``."""

from __future__ import annotations

import json as json_lib

from tyro.conf import Positional


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
        "bf16 on cpu": "fast (AVX512-BF16/AMX)" if capability in ("AVX512_BF16", "AMX") else "slow: train in fp32 on this CPU",
    }
    if json:
        print(json_lib.dumps(rows, indent=2))
    else:
        width = max(map(len, rows))
        for k, v in rows.items():
            print(f"{k:<{width}}  {v}")
    return 0


def params(model: Positional[str], json: bool = False) -> int:
    """Parameter accounting (total and activated, by component) of a preset or checkpoint; the model is
    also built on the meta device (no memory) to check the formula against the real module tree.

    Args:
        model: a preset name (debug, cpu-tiny, small, deepseek-v3-671b, ...) or a checkpoint directory
        json: print JSON
    """
    from gasungbi.config import resolve_model_config
    from gasungbi.model.accounting import count_params, format_params
    from gasungbi.model.transformer import build_model

    cfg = resolve_model_config(model)
    built = sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    pc = count_params(cfg)
    if json:
        print(json_lib.dumps({"model": model, "components": pc.components, "mtp": pc.mtp, "total": pc.total,
                              "activated": pc.activated, "total_with_mtp": pc.total_with_mtp,
                              "built_on_meta": built}, indent=2))
        return 0
    print(f"{model}: {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok})" if cfg.is_mla else
          f"{model}: dense {cfg.model_type}, {cfg.num_hidden_layers} layers, d={cfg.hidden_size}")
    print(format_params(cfg))
    print(f"built on the meta device: {built:,} parameters (formula: {pc.total_with_mtp:,})")
    return 0

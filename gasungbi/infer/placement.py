"""Where the weights live: everything on one device, or routed experts in system RAM.

The split KTransformers uses to run DeepSeek-V3/R1 on one GPU plus DDR5 memory: attention, dense
and shared-expert FFNs, norms, embedding and head (the weights every token reads) go to the
accelerator; the routed experts (~95% of DeepSeek-V3's weights, of which a token reads only 8 of
256 per layer) stay in system RAM and run on the CPU. Each MoE layer then sends its routed
experts' inputs to the CPU and their weighted sum back (a forward pre-hook and hook on the
``experts`` module), so the model code is unchanged.

:func:`plan_placement` computes the bytes per device from the config alone, before anything is
loaded; :func:`apply_placement` moves a loaded model (:func:`gasungbi.infer.load.load_for_inference`
does both, and quantizes or loads a quantized checkpoint). With no accelerator everything is on the CPU and the
split is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.infer.cache import KVCache
from gasungbi.model.accounting import count_params


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; otherwise the named device."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _bytes_per_weight(dtype: torch.dtype, quant: str | None, k: int, group_size: int) -> float:
    """Stored bytes per weight of a [N, k] matrix (scales included: bf16 per row / per group)."""
    if quant == "int8":
        return 1 + 2 / k
    if quant == "int4":
        return 0.5 + 4 / min(group_size, k)
    return torch.finfo(dtype).bits / 8


@dataclass
class Placement:
    """Bytes of weights per device, by component, computed from the config."""

    device: torch.device
    experts_device: torch.device
    components: dict[str, tuple[str, int]] = field(default_factory=dict)
    """component -> (device, bytes)"""
    kv_bytes_per_token: float = 0

    @property
    def split(self) -> bool:
        """Whether routed experts live on another device than the rest."""
        return self.experts_device != self.device

    @property
    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dev, n in self.components.values():
            out[dev] = out.get(dev, 0) + n
        return out

    def format(self, context: int | None = None) -> str:
        """A short report: per device, its total and its components."""
        lines = []
        for dev, total in self.bytes_per_device.items():
            parts = ", ".join(f"{name} {format_bytes(n)}" for name, (d, n) in self.components.items() if d == dev)
            lines.append(f"{dev}: {format_bytes(total)} of weights ({parts})")
        kv = f"KV cache: {self.kv_bytes_per_token:,.0f} bytes/token on {self.device}"
        if context:
            kv += f" ({format_bytes(self.kv_bytes_per_token * context)} for {context:,} tokens)"
        return "\n".join(lines + [kv])


def plan_placement(cfg: ModelConfig, device: str | torch.device = "cpu",
                   experts_device: str | torch.device | None = None,
                   dtype: torch.dtype = torch.float32, quant: str | None = None, group_size: int = 128) -> Placement:
    """Bytes per device for ``cfg`` (MTP modules included) in ``dtype``, quantized with ``quant``.

    The embedding, norms, router and MLA's ``kv_b_proj`` stay in ``dtype`` under quantization
    (see :mod:`gasungbi.infer.quant`); scales are counted as bf16.
    """
    device = resolve_device(device)
    exp_device = resolve_device(experts_device) if experts_device is not None else device
    pc = count_params(cfg)
    comps = dict(pc.components)
    for k, v in pc.mtp.items():
        comps[k] = comps.get(k, 0) + v
    fp = torch.finfo(dtype).bits / 8
    n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    kv_b = (cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * n_layers
            if cfg.is_mla else 0)
    routed = comps.pop("routed_experts", 0)
    embedding = comps.pop("embedding", 0)
    small = sum(comps.pop(k, 0) for k in ("norms", "router"))
    matrices = sum(comps.values()) - kv_b
    d = cfg.hidden_size
    out = {
        "embedding": (str(device), int(embedding * fp)),
        "norms+router+kv_b": (str(device), int((small + kv_b) * fp)),
        "dense weights": (str(device), int(matrices * _bytes_per_weight(dtype, quant, d, group_size))),
    }
    if routed:
        out["routed experts"] = (str(exp_device), int(routed * _bytes_per_weight(dtype, quant, d, group_size)))
    kv = KVCache.bytes_per_token(cfg, dtype, include_mtp=True)  # DeepSeek-V4's at its full context
    return Placement(device, exp_device, out, kv)


def offload_experts(model: nn.Module, experts_device: str | torch.device, move: bool = True) -> int:
    """Keep every routed-experts module on ``experts_device``: move it there (``move``) and route
    its inputs there and its output back to the caller's device. Returns the modules changed."""
    experts_device = torch.device(experts_device)
    from gasungbi.model.moe import MoE

    n = 0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        experts = moe.experts
        if move:
            experts.to(experts_device)

        def pre(module, args, _dev=experts_device):
            module._caller_device = args[0].device
            return tuple(a if a is None else a.to(_dev) for a in args)

        def post(module, args, out):
            return out.to(module._caller_device)

        experts.register_forward_pre_hook(pre)
        experts.register_forward_hook(post)
        n += 1
    return n


def apply_placement(model: nn.Module, placement: Placement) -> nn.Module:
    """Move ``model`` to ``placement.device``, routed experts to ``placement.experts_device``."""
    from gasungbi.model.moe import MoE

    if not placement.split:
        return model.to(placement.device)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    held = [m.experts for m in moes]
    for m in moes:  # detach the experts while the rest moves
        m._modules["experts"] = None
    model.to(placement.device)
    for m, e in zip(moes, held):
        m._modules["experts"] = e
    offload_experts(model, placement.experts_device, move=True)
    return model

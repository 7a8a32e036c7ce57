"""Building blocks shared by every block type: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): ``x / rms(x) * weight``, computed in fp32 as the HF code does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # inference: the same math in fewer ops (its CPU backward is slower than autograd
            # through the ops below, so training keeps them)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class FP32RMSNorm(RMSNorm):
    """DeepSeek-V4's RMSNorm: the weight multiplies the fp32 normalized x before the cast back to x's
    dtype (transformers' ``DeepseekV4RMSNorm``); the same as :class:`RMSNorm` in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        dtype = x.dtype
        x = x.float()
        return (self.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))).to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """silu(gate) * up; with DeepSeek-V4's ``limit``, gate clamped above at limit and up to [-limit, limit]."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``.

    Used for dense layers, for DeepSeekMoE's shared experts (width N_s x moe_intermediate_size)
    and for the Llama baseline. ``limit``: DeepSeek-V4's clamp (:func:`swiglu`).
    """

    def __init__(self, dim: int, hidden: int, limit: float | None = None):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.limit is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))

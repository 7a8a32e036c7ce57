"""Optimizers and learning-rate schedules.

* AdamW (Loshchilov & Hutter 2019): decay on matrices only, not on norms, biases or embeddings.
* Muon (Jordan et al. 2024, as in the modded-nanogpt speedrun): SGD-momentum (Nesterov) whose
  update for each weight matrix is orthogonalized by a quintic Newton-Schulz iteration, scaled by
  sqrt(max(1, rows/cols)). It is used for the hidden matrices of the blocks (attention
  projections, FFNs, and each routed expert, batched over the expert dimension); embeddings,
  output head, router, norms and biases stay on AdamW, as modded-nanogpt does.
  Deviation: Newton-Schulz runs in fp32 on CPU (bf16 is slow there) and bf16 on CUDA.
* ``moments="bf16"``: AdamW's first and second moments stored in BF16, computed in FP32, as
  DeepSeek-V3 does (Sec. 3.3.3); master weights stay FP32. Muon's momentum stays FP32.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T for the last two dims (modded-nanogpt's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D (or stacked 3-D expert) weights."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                g = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(g, group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (decoupled decay, bias-corrected) whose ``exp_avg``/``exp_avg_sq`` are kept in BF16:
    each step reads them to FP32, updates, and rounds them back (half the optimizer memory)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - b1 ** t))


def _split_params(model: nn.Module) -> tuple[list, list, list]:
    """(hidden matrices, other decayed matrices, no-decay params)."""
    hidden, other, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            no_decay.append(p)
        elif "embed_tokens" in name or "lm_head" in name or name.endswith("gate.weight"):
            other.append(p)
        else:
            hidden.append(p)
    return hidden, other, no_decay


def build_optimizers(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1,
                     betas: tuple[float, float] = (0.9, 0.95), muon_lr: float = 0.02,
                     moments: str = "fp32") -> list[torch.optim.Optimizer]:
    """``adamw``: one AdamW; ``muon``: Muon for hidden matrices + AdamW for the rest.
    ``moments``: ``fp32``, or ``bf16`` for :class:`AdamWBF16Moments` in place of AdamW.

    Each param group remembers its base ``initial_lr`` so that schedules multiply it.
    """
    hidden, other, no_decay = _split_params(model)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if moments not in ("fp32", "bf16"):
        raise ValueError(f"unknown moments dtype {moments!r}; choose fp32 or bf16")

    def adamw(groups, **kw):
        return AdamWBF16Moments(groups, **kw) if moments == "bf16" else torch.optim.AdamW(groups, **kw, **fused)

    if name == "adamw":
        opt = adamw([{"params": hidden + other, "weight_decay": weight_decay},
                     {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
        opts = [opt]
    elif name == "muon":
        opts = [Muon(hidden, lr=muon_lr),
                adamw([{"params": other, "weight_decay": weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)]
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose adamw or muon")
    for opt in opts:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return opts


def lr_multiplier(progress: float, warmup: float, schedule: str = "cosine", min_ratio: float = 0.1,
                  decay_frac: float = 0.2) -> float:
    """Learning-rate multiplier at ``progress`` in [0, 1]: the fraction of the run done at the end of
    the step (of its steps, or of its time budget: :class:`gasungbi.train.budget.Budget`).

    Linear warmup until progress ``warmup``, then ``cosine`` decay to ``min_ratio`` at progress 1,
    or ``wsd`` (warmup-stable-decay, Hu et al. 2024 MiniCPM): constant, then a linear decay to
    ``min_ratio`` over the last ``decay_frac`` of the run. With steps, progress = (step + 1) /
    total and warmup = warmup_steps / total.
    """
    if progress < warmup:
        return progress / warmup
    if schedule == "cosine":
        q = (progress - warmup) / max(1e-12, 1 - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(q, 1.0)))
    if schedule == "wsd":
        decay_start = 1 - decay_frac
        if progress < decay_start:
            return 1.0
        q = (progress - decay_start) / max(1e-12, decay_frac)
        return 1.0 - (1 - min_ratio) * min(q, 1.0)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")

"""Grouped matrix products: the rows of x in E consecutive groups, group e multiplied by the e-th
matrix of a stacked weight [E, N, K], for all groups in one call.

The routed experts of a DeepSeekMoE layer (:mod:`gasungbi.model.moe`) run this way: the token
slots sorted by expert are the groups, and group e meets expert e's weights. The groups' ends
``offs`` [E] (int32, cumulative) stay on the device, so the product needs no host sync.

It runs on ``torch._grouped_mm``, a private torch API (on the CPU in torch 2.13: fp32, bf16,
fp16; on CUDA: what the GPU and build support, which the probe finds out), wrapped here in an
autograd Function whose backward is two more grouped products (dX = dY W per group; dW = dY^T X
per group, zero for an empty group), each call a custom op (``gasungbi::grouped_mm``,
``gasungbi::grouped_mm_wgrad``) so that ``torch.compile`` treats it as opaque (the private op's
shape function takes bf16 only). What the private API needs is checked here, not assumed: rows
whose strides are multiples of 16 bytes (torch refuses others), contiguous operands (the ops make
them so), at least one row (its backward refuses an empty product), and, once per device and
dtype, agreement with the per-group loop on a probe (forward and both gradients, an empty group
included). Where any of that fails, or the API is absent,
:func:`grouped_linear` runs the loop: one product per group over ``x.split`` and ``w.unbind`` (a
host sync to read the group sizes; every group's weight gradient still arrives as one stacked
tensor, not E full-size zero tensors as ``w[e]`` would give). Under autocast the operands are
cast to the autocast dtype first, as ``F.linear``'s would be.
"""

from __future__ import annotations

import torch

_PROBED: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> torch._grouped_mm agrees with the loop


@torch.library.custom_op("gasungbi::grouped_mm", mutates_args=())
def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Per group e of the rows of x: x_e w[e]^T (``transpose``; x (M, K), w (E, N, K) -> (M, N)) or
    x_e w[e] (x (M, N), w (E, N, K) -> (M, K)). An opaque op to ``torch.compile``: the private op's
    own shape function accepts bf16 only."""
    return torch._grouped_mm(x.contiguous(), w.transpose(1, 2) if transpose else w.contiguous(), offs=offs)


@_grouped_mm.register_fake
def _(x, w, offs, transpose):
    return x.new_empty(x.shape[0], w.shape[1] if transpose else w.shape[2])


@torch.library.custom_op("gasungbi::grouped_mm_wgrad", mutates_args=())
def _grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per group e: dy_e^T x_e, dy (M, N), x (M, K) -> (E, N, K) (zero for an empty group)."""
    return torch._grouped_mm(dy.contiguous().t(), x.contiguous(), offs=offs)


@_grouped_wgrad.register_fake
def _(dy, x, offs):
    return dy.new_empty(offs.shape[0], dy.shape[1], x.shape[1])


class _GroupedMM(torch.autograd.Function):
    """y = x_e w[e]^T for each group e of the rows of x (M, K); w (E, N, K), offs (E,) int32 group ends."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return _grouped_mm(x, w, offs, True)  # (M, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx = _grouped_mm(dy, w, offs, False) if ctx.needs_input_grad[0] else None  # (M, K)
        dw = _grouped_wgrad(dy, x, offs) if ctx.needs_input_grad[1] else None  # (E, N, K)
        return dx, dw, None


def _loop(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The per-group reference: one product per group (empty ones included)."""
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([part @ we.t() for part, we in zip(x.split(sizes), w.unbind(0))])


@torch.compiler.disable
def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``_GroupedMM`` runs on ``device`` in ``dtype`` and agrees with :func:`_loop`,
    forward and backward, on a small case with an empty group."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*shape, generator=g).to(device, dtype) for shape in ((24, 32), (3, 16, 32), (24, 16)))
    offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
    try:
        with torch.enable_grad():
            got = [_GroupedMM.apply(x.requires_grad_(), w.requires_grad_(), offs)]
            got += torch.autograd.grad(got[0], (x, w), dy)
            want = [_loop(x, w, offs)]
            want += torch.autograd.grad(want[0], (x, w), dy)
    except (RuntimeError, NotImplementedError):
        return False
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
               for a, b in zip(got, want))


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w[e]^T`` per group runs on ``torch._grouped_mm`` (module docstring)."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0 or x.dtype != w.dtype:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if (w.shape[1] * w.element_size()) % 16 or (w.shape[2] * w.element_size()) % 16:
        return False
    key = (str(x.device), x.dtype)
    if key not in _PROBED:
        _PROBED[key] = _probe(x.device, x.dtype)
    return _PROBED[key]


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K) in E groups of consecutive rows (group e: rows offs[e-1]:offs[e], offs (E,) int32
    cumulative, offs[-1] == M), w (E, N, K) -> (M, N): each group times its own w[e]^T."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, w = x.to(dtype), w.to(dtype)
    if grouped_mm_usable(x, w):
        return _GroupedMM.apply(x.contiguous(), w, offs)
    return _loop(x, w, offs)

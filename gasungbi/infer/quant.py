"""Weight-only quantization: int8 per output channel, int4 group-wise; a state-dict transform plus
a module swap, as gpt-fast does. This module holds the maths and the state-dict transform; the
quantized modules, their kernels and the swap are in :mod:`gasungbi.infer.quant_modules`.

* ``int8``: w ~ q * s, q in [-127, 127], one fp scale per output row (symmetric).
* ``int4``: per group of ``group_size`` input columns, w ~ (q - 8) * s + z with q in [0, 15]
  (asymmetric min/max; the layout of gpt-fast and torchao's "tinygemm" kernels), two values per
  byte, high nibble first.

What is quantized: every ``nn.Linear`` of the model (attention projections, dense FFNs, shared
experts, the MTP projection, the output head unless tied) and the routed experts. Left in floating
point: the embedding (one row is read per token), norms, the router, DeepSeek-V3.2's indexer (its
scores choose the keys by a top-k, which rounding flips), and MLA's ``kv_b_proj``,
whose weight the absorbed attention uses as a tensor (W^UK / W^UV folded into query and output).
A matrix whose shape the int4 kernels cannot take (rows not a multiple of 16, or columns not a
multiple of 32) is stored as int8 instead; one whose input width is not a multiple of 16 stays in
floating point (torch's CPU int8 kernel crashes on it: :data:`INT8_K_MULTIPLE`).

:func:`quantize_state_dict` gives the *portable* state dict: each quantized tensor's values under
the float parameter's name and its scales under ``<that name>_scales``, every other tensor the
float model's (the file format that holds it: :mod:`gasungbi.interop.quantized`).
:func:`portable_layout` reads back from such a state dict the mode and int4 group size of a tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from gasungbi.model.moe import Experts
from gasungbi.model.transformer import Transformer

MODES = ("int8", "int4")
SKIP = ("kv_b_proj", "o_a_proj")  # read as raw weights: by the absorbed MLA, by V4's grouped output
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # an MLP's projections; the experts' stacked tensors
_GROUPS = (256, 128, 64, 32)
# torch 2.13's CPU _weight_int8pack_mm segfaults when a weight's input width is not a multiple of 16
# (seen for 8, 24, 40; 16, 32, 48, 64, 96 work): such matrices stay in floating point
INT8_K_MULTIPLE = 16
_MODE_OF = {torch.int8: "int8", torch.uint8: "int4"}
CHUNK_ELEMENTS = 2**24  # the largest matrix quantized at once (64 MiB in float32)  # the dtype of the quantized values


# ---------------------------------------------------------------------------------------------
# quantize / dequantize tensors (leading dims are batch dims: experts [E, N, K] work too)
# ---------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> int8 [..., N, K], fp32 scales [..., N] (symmetric, per output row)."""
    w = w.float()
    scales = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12)
    q = (w / scales[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[..., None]


def int4_group_size(n: int, k: int, requested: int = 128) -> int | None:
    """The group size used for an [n, k] matrix: the largest of 256/128/64/32 not above
    ``requested`` that divides k; None when the int4 kernels cannot take the shape."""
    if n % 16 or k % 32:
        return None
    return next((g for g in _GROUPS if g <= requested and k % g == 0), None)


def check_group_size(group_size: int) -> None:
    """A ValueError when no matrix can be quantized to int4 in groups of at most ``group_size``
    columns (below the smallest group the kernels take, every matrix would stay in floating point)."""
    if group_size < _GROUPS[-1]:
        raise ValueError(f"--group-size {group_size}: int4 groups hold {', '.join(map(str, reversed(_GROUPS)))} "
                         f"columns (the largest not above --group-size that divides a row); give at least {_GROUPS[-1]}")


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> packed uint8 [..., N, K/2] and fp32 scales_and_zeros [..., K/g, N, 2]."""
    *lead, N, K = w.shape
    g = w.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = ((g - lo) / scales).round().clamp(0, 15).to(torch.uint8).reshape(*lead, N, K)
    packed = (q[..., ::2] << 4) | q[..., 1::2]
    sz = torch.stack((scales[..., 0], zeros[..., 0]), dim=-1)  # (..., N, K/g, 2)
    return packed, sz.transpose(-3, -2).contiguous()  # (..., K/g, N, 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K/2] -> int32 values 0..15 [..., N, K]."""
    q = torch.stack((packed >> 4, packed & 15), dim=-1)
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()  # (..., N, K)
    *lead, N, K = q.shape
    G = sz.shape[-3]
    scales, zeros = sz.transpose(-3, -2).unbind(-1)  # (..., N, G)
    q = q.reshape(*lead, N, G, K // G)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(*lead, N, K)


def _quantize(w: torch.Tensor, mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable (values, scales) of w [..., N, K]; int4 falls back to int8 on shapes it cannot take.
    A matrix of more than :data:`CHUNK_ELEMENTS` is quantized a block of rows at a time (rows are
    independent: the result is the same), so the float32 temporaries stay small beside it."""
    g = int4_group_size(w.shape[-2], w.shape[-1], group_size) if mode == "int4" else None
    one = quantize_int8 if g is None else lambda block: quantize_int4(block, g)
    if w.dim() != 2 or w.numel() <= CHUNK_ELEMENTS:
        return one(w)
    rows = max(1, CHUNK_ELEMENTS // w.shape[-1])
    parts = [one(w[i:i + rows]) for i in range(0, w.shape[0], rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts], dim=0 if g is None else -2)


def quantize_weight(w: torch.Tensor, mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Portable (values, scales) of w [..., N, K], or None where it stays in floating point (an input
    width that is not a multiple of :data:`INT8_K_MULTIPLE`)."""
    return None if w.shape[-1] % INT8_K_MULTIPLE else _quantize(w, mode, group_size)


def check_mode(mode: str) -> None:
    """``ValueError`` naming the supported modes unless ``mode`` is one."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; supported: {', '.join(MODES)}")


# ---------------------------------------------------------------------------------------------
# state-dict transform
# ---------------------------------------------------------------------------------------------

def quant_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the Linear layers and the Experts modules to quantize."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not n.endswith(SKIP) and ".indexer." not in n and not (tied and n == "lm_head")]
    experts = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    return linears, experts


def quantized_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the tensors to quantize: the target Linears' weights and the routed
    experts' stacked projections."""
    linears, experts = quant_targets(model)
    return [f"{n}.weight" for n in linears] + [f"{n}.{p}" for n in experts for p in EXPERT_PROJS]


@torch.no_grad()
def quantize_state_dict(model: Transformer, mode: str = "int8", group_size: int = 128) -> dict[str, torch.Tensor]:
    """The portable quantized state dict of ``model`` (on the CPU; see the module docstring)."""
    check_mode(mode)
    out = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    for key in quantized_keys(model):
        quantized = quantize_weight(out[key], mode, group_size)
        if quantized is not None:
            out[key], out[f"{key}_scales"] = quantized
    return out


def portable_layout(qsd: dict[str, torch.Tensor], key: str, shape: torch.Size) -> tuple[str, int | None] | None:
    """(mode, int4 groups per row) in which ``qsd`` holds the float tensor ``key`` of ``shape``
    [..., N, K]: the mode from the values' dtype (else from the scales' rank), the groups from the
    scales' shape; None when it is in floating point (neither quantized values nor scales)."""
    v, s = qsd.get(key), qsd.get(f"{key}_scales")
    mode = _MODE_OF.get(v.dtype) if v is not None else None
    if mode is None and s is not None:
        mode = "int4" if s.dim() == len(shape) + 1 else "int8"
    if mode != "int4":
        return None if mode is None else ("int8", None)
    if s is None or s.dim() != len(shape) + 1:
        return "int4", 1  # the strict load names the missing or misshapen scales
    k, groups = shape[-1], s.shape[-3]
    if groups < 1 or k % groups or k // groups not in _GROUPS:
        raise ValueError(f"{key}_scales: {groups} groups of {k} columns; the int4 kernels take groups of "
                         f"{', '.join(map(str, _GROUPS))}")
    return "int4", groups

"""FP8 training as DeepSeek-V3 did it (V3 Sec. 3.3): block-scaled E4M3 GEMMs, applied as a module swap.

Fine-grained quantization (V3 Sec. 3.3.2, Fig. 7):
    activations  per 1x128 tile (one token, 128 channels),  weights per 128x128 block,
    scale s = max|x| / 448 from the tile itself (online, no delayed scaling), q = E4M3(x / s),
    Y[m, n] = sum_c  s_x[m, c] s_w[n // 128, c]  (q_x[m, c-th 128] . q_w[n, c-th 128])
i.e. every 128-wide chunk c of the inner dimension is multiplied in FP8 and its partial sum is
promoted to FP32 (with its two scales) before it is added to the accumulator. All three GEMMs of a
Linear take FP8 inputs with the tiling its inner dimension needs:
    forward  Y  = X W^T     X: 1x128 along K (cached for the backward in FP8),   W: 128x128
    dgrad    dX = dY W      dY: 1x128 along N,                                  W^T: the same 128x128 blocks
    wgrad    dW = dY^T X    dY^T and X^T: 1x128 along the tokens (X read back from FP8, transposed and
                            re-quantized, as V3 Sec. 3.5.2 describes)
Kept in high precision (V3 Sec. 3.3.1): embedding, output head, MoE router, norms, the attention
core (softmax(QK^T)V); master weights and gradients of the weights are FP32.

Backends: on CUDA, ``torch._scaled_mm`` with 1x128/128x128 block scales where this torch and GPU
accept them (SM90; checked once per tiling against the emulation); everywhere else, and for any
tiling the GPU refuses (with a warning), an exact emulation: the E4M3 values (``torch.float8_e4m3fn``)
multiplied in FP32 one 128-wide K chunk at a time, each chunk's sum scaled and accumulated in FP32.
Deviation, stated: within a chunk the emulation sums in FP32, where H800 tensor cores keep about 14
bits (the reason V3 promotes every 128 elements); so the emulation is slightly more accurate than
the hardware inside a chunk and identical in everything else.

:func:`apply_fp8` swaps every ``nn.Linear`` except the output head for :class:`Fp8Linear` (attention
projections, dense MLPs, shared experts, MTP's ``eh_proj``) and the routed experts for
:class:`Fp8Experts`; parameter names and values are unchanged, so checkpoints are the same.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.model.layers import swiglu
from gasungbi.model.moe import Experts, dispatch, expert_counts

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128
TOKEN_TILE = (1, BLOCK)  # activations and gradients: one row, 128 inner-dimension channels
WEIGHT_BLOCK = (BLOCK, BLOCK)
_TINY = 1e-12  # floor of max|x| so that an all-zero tile gets a finite scale


# ---------------------------------------------------------------------------------------------
# quantizers
# ---------------------------------------------------------------------------------------------

def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to ``float8_e4m3fn`` with saturation at +-448 (the cast alone would give NaN above it)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled E4M3 of a 2-D tensor: x (M, K) -> (q (M, K) float8_e4m3fn, scale (ceil(M/br), ceil(K/bc)) fp32).

    Each ``block`` = (br, bc) tile gets s = max|tile| / 448 (ragged edges are zero-padded to the
    block, which leaves the max unchanged); q = E4M3(x / s) and x ~ q * s. ``pow2_scales`` rounds s
    up to a power of two (the UE8M0 scales of DeepSeek's later kernels): then x / s is exact and
    only the E4M3 rounding remains.
    """
    M, K = x.shape
    br, bc = block
    mb, kb = -(-M // br), -(-K // bc)
    tiles = F.pad(x.float(), (0, kb * bc - K, 0, mb * br - M)).reshape(mb, br, kb, bc)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=_TINY) / E4M3_MAX  # (mb, kb)
    if pow2_scales:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = to_e4m3(tiles / scale[:, None, :, None]).reshape(mb * br, kb * bc)[:M, :K].contiguous()
    return q, scale


def expand_scale(scale: torch.Tensor, block: tuple[int, int], M: int, K: int) -> torch.Tensor:
    """Block scales (ceil(M/br), ceil(K/bc)) -> one per element (M, K)."""
    return scale.repeat_interleave(block[0], 0)[:M].repeat_interleave(block[1], 1)[:, :K]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (M, K) E4M3 with block scales -> (M, K) in ``dtype``: q * s, computed in FP32."""
    return (q.float() * expand_scale(scale, block, *q.shape)).to(dtype)


# ---------------------------------------------------------------------------------------------
# GEMM on FP8 operands: a (M, K) @ b (N, K)^T, both quantized along K
# ---------------------------------------------------------------------------------------------

def fp8_gemm_emulated(a: torch.Tensor, sa: torch.Tensor, block_a: tuple[int, int], b: torch.Tensor, sb: torch.Tensor,
                      block_b: tuple[int, int], out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T from E4M3 operands and their block scales, both tiled 128 along K.

    Per 128-wide chunk c of K: the E4M3 values are multiplied in FP32 (their products are exact),
    the chunk's sum is scaled by s_a[rows, c] s_b[cols, c] and added to an FP32 accumulator.
    """
    M, K = a.shape
    N = b.shape[0]
    assert block_a[1] == block_b[1] == BLOCK and b.shape[1] == K
    ra = sa.repeat_interleave(block_a[0], 0)[:M]  # (M, Kc)
    rb = sb.repeat_interleave(block_b[0], 0)[:N]  # (N, Kc)
    af, bf = a.float(), b.float()
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for c in range(-(-K // BLOCK)):
        k0, k1 = c * BLOCK, min(K, (c + 1) * BLOCK)
        partial = af[:, k0:k1] @ bf[:, k0:k1].t()  # (M, N), the chunk's FP8 MMA
        acc += partial * ra[:, c:c + 1] * rb[:, c][None, :]  # promoted to FP32 with its scales
    return acc.to(out_dtype)


_SCALED_MM: dict[tuple, str | None] = {}  # (device, block_a, block_b) -> the scale layout _scaled_mm takes, or None


def _scaled_mm(a, sa, b, sb, out_dtype, layout: str = "row"):
    """``torch._scaled_mm`` with block scales in torch's convention (mat2 = b^T column-major,
    scale_a (M|M/128, K/128), scale_b = sb^T (K/128, N|N/128)); ``layout`` "col" passes the scales
    outer-dimension-major, which some builds require."""
    sa, sb = sa.contiguous(), sb.t().contiguous()
    if layout == "col":
        sa, sb = sa.t().contiguous().t(), sb.t().contiguous().t()
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _cuda_blockwise_layout(device: torch.device, block_a, block_b) -> str | None:
    """The scale layout with which this GPU and torch run ``_scaled_mm`` with these block scales and
    agree with the emulation on a probe, or None (decided once per device and tiling; None warns once)."""
    key = (str(device), block_a, block_b)
    if key not in _SCALED_MM:
        found, why = None, "needs an SM89/SM90 GPU"
        if torch.cuda.get_device_capability(device) >= (8, 9):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(256, 384, device=device, generator=g)
            w = torch.randn(256, 384, device=device, generator=g)
            (qa, sa), (qb, sb) = quantize(x, block_a), quantize(w, block_b)
            want = fp8_gemm_emulated(qa, sa, block_a, qb, sb, block_b)
            for layout in ("row", "col"):
                try:
                    got = _scaled_mm(qa, sa, qb, sb, torch.float32, layout)
                except Exception as e:  # torch raises RuntimeError/NotImplementedError by build and GPU
                    why = f"torch refuses it ({str(e).splitlines()[0][:120]})"
                    continue
                if torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item()):
                    found = layout
                    break
                why = "its result differs from the emulation"
        if found is None:
            warnings.warn(f"FP8 GEMM with {block_a[0]}x{block_a[1]} x {block_b[0]}x{block_b[1]} scales: "
                          f"torch._scaled_mm not used on {device} ({why}); using the exact emulation instead",
                          RuntimeWarning, stacklevel=3)
        _SCALED_MM[key] = found
    return _SCALED_MM[key]


def fp8_gemm(a, sa, block_a, b, sb, block_b, out_dtype=torch.float32) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T on FP8 operands: ``torch._scaled_mm`` where the GPU takes these block
    scales and the shapes suit it (multiples of 16, K of 128), else the emulation."""
    M, K = a.shape
    if a.is_cuda and K % BLOCK == 0 and M % 16 == 0 and b.shape[0] % 16 == 0:
        layout = _cuda_blockwise_layout(a.device, block_a, block_b)
        if layout is not None:
            return _scaled_mm(a, sa, b, sb, out_dtype, layout)
    return fp8_gemm_emulated(a, sa, block_a, b, sb, block_b, out_dtype)


# ---------------------------------------------------------------------------------------------
# the Linear as an autograd Function
# ---------------------------------------------------------------------------------------------

class Fp8Matmul(torch.autograd.Function):
    """y = x w^T for x (M, K), w (N, K), with all three GEMMs on FP8 operands (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            xq, sx = quantize(x, TOKEN_TILE)
            wq, sw = quantize(w, WEIGHT_BLOCK)
            y = fp8_gemm(xq, sx, TOKEN_TILE, wq, sw, WEIGHT_BLOCK, out_dtype)
        ctx.save_for_backward(xq, sx, wq, sw)  # the activation is cached in FP8
        ctx.dtypes = (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, sx, wq, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:  # dgrad: dY (1x128 along N) @ W (128x128 blocks, transposed)
                dyq, sdy = quantize(dy, TOKEN_TILE)
                dx = fp8_gemm(dyq, sdy, TOKEN_TILE, wq.t().contiguous(), sw.t().contiguous(), WEIGHT_BLOCK, x_dtype)
            if ctx.needs_input_grad[1]:  # wgrad: dY^T and X^T, both 1x128 along the tokens
                x = dequantize(xq, sx, TOKEN_TILE)
                dytq, sdyt = quantize(dy.t(), TOKEN_TILE)
                xtq, sxt = quantize(x.t(), TOKEN_TILE)
                dw = fp8_gemm(dytq, sdyt, TOKEN_TILE, xtq, sxt, TOKEN_TILE, w_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs: x (..., K), weight (N, K) -> (..., N)."""
    lead = x.shape[:-1]
    y = Fp8Matmul.apply(x.reshape(-1, x.shape[-1]), weight).view(*lead, weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose matmul runs in FP8 (same parameters, names and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


class Fp8Experts(Experts):
    """Routed experts whose three matmuls run in FP8 (the stacked parameters are unchanged), one
    expert at a time (:func:`~gasungbi.model.moe.dispatch`): the FP8 GEMM is not grouped."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        return dispatch(self.expert, x, idx, weights, expert_counts(idx, self.gate_proj.shape[0], counts))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(swiglu(fp8_linear(x, self.gate_proj[e]), fp8_linear(x, self.up_proj[e]), self.limit),
                          self.down_proj[e])


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------

_KEEP = ("lm_head",)  # the output head; embedding, router and norms are not nn.Linear


def apply_fp8(model: nn.Module) -> nn.Module:
    """Swap in FP8 compute, in place: every ``nn.Linear`` but the output head becomes
    :class:`Fp8Linear`, every :class:`Experts` :class:`Fp8Experts` (the objects keep their
    parameters, so an optimizer built before or after sees the same tensors). Returns ``model``."""
    n = 0
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in _KEEP:
            m.__class__ = Fp8Linear
            n += 1
        elif type(m) is Experts:
            m.__class__ = Fp8Experts
            n += 1
    if n == 0:
        warnings.warn("apply_fp8: no Linear or Experts module to convert", RuntimeWarning, stacklevel=2)
    return model


"""Weight-only quantization: int8 per output channel, int4 group-wise; a state-dict transform plus
a module swap, as gpt-fast does.

* ``int8``: w ~ q * s, q in [-127, 127], one fp scale per output row (symmetric).
* ``int4``: per group of ``group_size`` input columns, w ~ (q - 8) * s + z with q in [0, 15]
  (asymmetric min/max; the layout of gpt-fast and torchao's "tinygemm" kernels).

What is quantized: every ``nn.Linear`` of the model (attention projections, dense FFNs, shared
experts, the MTP projection, the output head unless tied) and the routed experts. Left in floating
point: the embedding (one row is read per token), norms, the router, and MLA's ``kv_b_proj``,
whose weight the absorbed attention uses as a tensor (W^UK / W^UV folded into query and output).
A matrix whose shape the int4 kernels cannot take (rows not a multiple of 16, or columns not a
multiple of 32) is stored as int8 instead.

Modules. A quantized ``nn.Linear`` becomes a :class:`QuantLinear`; a SwiGLU ``MLP`` (dense layers,
shared experts) becomes a :class:`QuantMLP` and each routed expert a gate+up pair in
:class:`QuantExperts`, both with gate and up fused into one matmul and the activations kept in the
compute dtype between the two matmuls (fewer kernel calls and casts per decoded token).

Kernels (activations are cast to bf16 for the product, which is where PyTorch's fast CPU paths
are; the result is cast back):
  CPU   int8: ``torch._weight_int8pack_mm``; int4: ``torch._convert_weight_to_int4pack_for_cpu`` +
        ``torch._weight_int4pack_mm_for_cpu``
  CUDA  int8: dequantize-and-matmul (gpt-fast's int8 path; PyTorch's CUDA int8pack kernel is a
        naive fp32 one); int4: ``torch._convert_weight_to_int4pack`` + ``torch._weight_int4pack_mm``

Files. :func:`quantize_state_dict` gives a *portable* state dict (int8 [N, K] + scales [N]; int4
as two 4-bit values per byte [N, K/2], high nibble first, + scales_and_zeros [K/g, N, 2]), which
:func:`save_quantized` writes with the config (``quantization_config`` in config.json) and
:func:`load_quantized` turns into the kernels' layout for the device it loads on. A quantized
checkpoint is gasungbi's own: transformers refuses its ``quant_method``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.config import ModelConfig, from_hf_config, to_hf_config
from gasungbi.infer.placement import offload_experts
from gasungbi.model.layers import MLP
from gasungbi.model.moe import Experts, dispatch
from gasungbi.model.transformer import Transformer, build_model

MODES = ("int8", "int4")
QUANT_METHOD = "gasungbi"
SKIP = ("kv_b_proj",)  # read as a raw weight by the absorbed MLA
_GROUPS = (256, 128, 64, 32)
_COMPUTE = torch.bfloat16


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


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy unless ``t`` already starts on a 64-byte boundary: the CPU int8 kernel
    crashes (segfault, torch 2.13) on weights that do not, e.g. tensors from safetensors' load_file."""
    t = t.contiguous()
    return t if t.data_ptr() % 64 == 0 else t.clone()


class _Weight:
    """One quantized matrix in the kernel layout of its device, and its matmul ``x @ w.T``."""

    def __init__(self, mode: str, q: torch.Tensor, scales: torch.Tensor, device: torch.device):
        """``q``/``scales``: portable int8 + [N] scales, or packed uint8 + [K/g, N, 2]."""
        self.mode, self.cuda = mode, device.type == "cuda"
        self.out_features = q.shape[0]
        if mode == "int8":
            self.in_features = q.shape[1]
            self.w = _aligned(q.to(device))
            self.s = _aligned(scales.to(device, _COMPUTE))
        else:
            self.in_features = q.shape[1] * 2
            self.group_size = self.in_features // scales.shape[0]
            if self.cuda:
                tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
                self.w = torch._convert_weight_to_int4pack(q.to(device).contiguous(), tiles)
            else:
                self.w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).contiguous(), 2)
            self.s = scales.to(device, _COMPUTE).contiguous()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        return self.mm_compute(x.to(_COMPUTE)).to(x.dtype)

    def mm_compute(self, xc: torch.Tensor) -> torch.Tensor:
        """xc [M, K] already in the compute dtype (bf16) -> [M, N] in bf16."""
        if self.mode == "int8":
            if self.cuda:
                return F.linear(xc, self.w.to(_COMPUTE)) * self.s
            return torch._weight_int8pack_mm(xc, self.w, self.s)
        if self.cuda:
            return torch._weight_int4pack_mm(xc, self.w, self.group_size, self.s)
        return torch._weight_int4pack_mm_for_cpu(xc, self.w, self.group_size, self.s)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w, self.s]


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear`` (built from the portable tensors by the loader).

    The kernel layout is specific to the device it was built for: place the float model first
    (or pass ``device``/``experts_device`` to the loader), never ``.to()`` a quantized model."""

    def __init__(self, weight: _Weight, bias: torch.Tensor | None):
        super().__init__()
        self.qweight = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.register_buffer("weight", weight.w, persistent=False)  # for .device / memory accounting
        self.register_buffer("scales", weight.s, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f", group_size={self.qweight.group_size}" if self.qweight.mode == "int4" else ""
        return f"{self.in_features}, {self.out_features}, {self.qweight.mode}{g}"


def _swiglu(gate_up: _Weight, down: _Weight, xc: torch.Tensor) -> torch.Tensor:
    """SwiGLU with gate and up fused into one matmul, all in the compute dtype: xc [n, d] -> [n, d]."""
    gu = gate_up.mm_compute(xc)  # (n, 2I)
    inter = gu.shape[-1] // 2
    return down.mm_compute(F.silu(gu[:, :inter]) * gu[:, inter:])


class QuantMLP(nn.Module):
    """A quantized SwiGLU ``MLP`` (dense layers, shared experts) with gate and up fused into one
    matmul; activations are cast to the compute dtype once on the way in and once on the way out."""

    def __init__(self, gate_up: _Weight, down: _Weight):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        for i, w in enumerate((gate_up, down)):
            for j, t in enumerate(w.tensors()):
                self.register_buffer(f"_w{i}_{j}", t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _swiglu(self.gate_up, self.down, x.reshape(-1, x.shape[-1]).to(_COMPUTE))
        return y.to(x.dtype).view(x.shape)


class QuantExperts(nn.Module):
    """Routed experts with quantized weights; the same sorted-by-expert loop as ``Experts``, with
    each expert's gate and up projections fused into one matmul. Tokens are cast to the compute
    dtype once for all experts; each expert's output is cast back before it is weighted and summed."""

    def __init__(self, gate_up: list[_Weight], down: list[_Weight]):
        super().__init__()
        self.gate_up, self.down = gate_up, down
        for i, w in enumerate(gate_up + down):  # visible to .to()-free accounting and .device
            for j, t in enumerate(w.tensors()):
                self.register_buffer(f"_w{i}_{j}", t, persistent=False)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
        def expert(e: int, xc: torch.Tensor) -> torch.Tensor:
            return _swiglu(self.gate_up[e], self.down[e], xc).to(x.dtype)

        return dispatch(expert, x.to(_COMPUTE), idx, weights, counts).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# state-dict transform
# ---------------------------------------------------------------------------------------------

def _targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the Linear layers and the Experts modules to quantize."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and not n.endswith(SKIP) and not (tied and n == "lm_head")]
    experts = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    return linears, experts


def _quantize(w: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    """{"": q, "scales" or "scales_and_zeros": ...}; int4 falls back to int8 on shapes it cannot take."""
    g = int4_group_size(w.shape[-2], w.shape[-1], group_size) if mode == "int4" else None
    if g is None:
        q, s = quantize_int8(w)
        return {"": q, "scales": s}
    q, sz = quantize_int4(w, g)
    return {"": q, "scales_and_zeros": sz}


@torch.no_grad()
def quantize_state_dict(model: Transformer, mode: str = "int8", group_size: int = 128) -> dict[str, torch.Tensor]:
    """The portable quantized state dict of ``model`` (on the CPU; see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; supported: {', '.join(MODES)}")
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    linears, experts = _targets(model)
    out = dict(sd)
    for name in linears:
        w = out.pop(f"{name}.weight")
        for suffix, t in _quantize(w, mode, group_size).items():
            out[f"{name}.weight" if not suffix else f"{name}.{suffix}"] = t
    for name in experts:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = out.pop(f"{name}.{proj}")
            for suffix, t in _quantize(w, mode, group_size).items():
                out[f"{name}.{proj}" if not suffix else f"{name}.{proj}_{suffix}"] = t
    return out


def _portable(qsd: dict, key: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    if f"{key}_scales" in qsd or f"{key}.scales" in qsd:
        s = qsd.get(f"{key}_scales", qsd.get(f"{key}.scales"))
        return "int8", qsd[key if key in qsd else f"{key}.weight"], s
    s = qsd.get(f"{key}_scales_and_zeros", qsd.get(f"{key}.scales_and_zeros"))
    return "int4", qsd[key if key in qsd else f"{key}.weight"], s


def _cat_weight(gate: tuple, up: tuple, device: torch.device, name: str) -> _Weight:
    """One kernel-layout weight for a gate and an up projection stacked along the output
    (portable (mode, q, scales) triples of the same input width)."""
    (mg, g, gs), (mu, u, us) = gate, up
    if mg != mu:
        raise ValueError(f"{name}: gate_proj is {mg} but up_proj is {mu}")
    s_dim = 0 if mg == "int8" else 1  # rows of scales [N] / scales_and_zeros [K/g, N, 2]
    return _Weight(mg, torch.cat((g, u)), torch.cat((gs, us), dim=s_dim), device)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def from_quantized_state_dict(cfg: ModelConfig, qsd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float32,
                              experts_device: str | torch.device | None = None) -> Transformer:
    """Build the model with quantized modules from a portable state dict, on ``device`` (routed
    experts on ``experts_device`` when given; see :mod:`gasungbi.infer.placement`)."""
    device = torch.device(device)
    exp_device = torch.device(experts_device) if experts_device is not None else device
    model = build_model(cfg, device="meta")
    used: set[str] = set()
    for name in [n for n, m in model.named_modules() if isinstance(m, MLP)]:  # gate and up fused
        gate, up, down = (f"{name}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
        if not all(f"{k}.scales" in qsd or f"{k}.scales_and_zeros" in qsd for k in (gate, up, down)):
            continue
        used |= {f"{k}.{suffix}" for k in (gate, up, down) for suffix in ("weight", "scales", "scales_and_zeros")}
        _set_module(model, name, QuantMLP(_cat_weight(_portable(qsd, gate), _portable(qsd, up), device, name),
                                          _Weight(*_portable(qsd, down), device)))
    linears, experts = _targets(model)
    for name in linears:
        if f"{name}.scales" not in qsd and f"{name}.scales_and_zeros" not in qsd:
            continue  # left in floating point
        mode, q, s = _portable(qsd, name)
        used |= {f"{name}.weight", f"{name}.scales", f"{name}.scales_and_zeros", f"{name}.bias"}
        bias = qsd.get(f"{name}.bias")
        _set_module(model, name, QuantLinear(_Weight(mode, q, s, device),
                                             None if bias is None else bias.to(device, dtype)))
    for name in experts:
        if f"{name}.gate_proj_scales" not in qsd and f"{name}.gate_proj_scales_and_zeros" not in qsd:
            continue
        parts = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts[proj] = _portable(qsd, f"{name}.{proj}")
            used |= {f"{name}.{proj}", f"{name}.{proj}_scales", f"{name}.{proj}_scales_and_zeros"}
        (mg, g, gs), (mu, u, us), (md, d, ds) = parts["gate_proj"], parts["up_proj"], parts["down_proj"]
        gate_up = [_cat_weight((mg, g[e], gs[e]), (mu, u[e], us[e]), exp_device, name) for e in range(g.shape[0])]
        down = [_Weight(md, d[e], ds[e], exp_device) for e in range(d.shape[0])]
        _set_module(model, name, QuantExperts(gate_up, down))
    rest = {k: v for k, v in qsd.items() if k not in used}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise ValueError(f"quantized state dict does not match the config: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    rest = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in rest.items()}
    model.load_state_dict(rest, strict=False, assign=True)
    if cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    if exp_device != device:
        offload_experts(model, exp_device, move=False)
    return model.eval()


def quantize(model: Transformer, mode: str = "int8", group_size: int = 128,
             device: str | torch.device | None = None, experts_device: str | torch.device | None = None) -> Transformer:
    """A quantized copy of ``model`` (state-dict transform, then module swap)."""
    w = model.model.embed_tokens.weight
    return from_quantized_state_dict(model.config, quantize_state_dict(model, mode, group_size),
                                     device if device is not None else w.device, w.dtype, experts_device)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def save_quantized(qsd: dict[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike, mode: str,
                   group_size: int, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a portable quantized state dict with its config (and tokenizer files) to ``path``."""
    from safetensors.torch import save_file

    from gasungbi.interop.hf import copy_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, seen = {}, set()
    for k, v in qsd.items():
        v = v.detach().to("cpu").contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    hf = to_hf_config(cfg)
    hf["quantization_config"] = {"quant_method": QUANT_METHOD, "mode": mode, "group_size": group_size}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "quantization": mode})
    os.replace(tmp, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)
    return path


def quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a gasungbi-quantized checkpoint directory, else None."""
    f = Path(path) / "config.json"
    if not f.exists():
        return None
    q = json.loads(f.read_text()).get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD else None


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   experts_device: str | torch.device | None = None) -> Transformer:
    """Load a checkpoint written by :func:`save_quantized`, in the kernel layout of ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    if quantization_config(path) is None:
        raise ValueError(f"{path} is not a gasungbi-quantized checkpoint (no quantization_config in config.json)")
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    qsd = load_file(str(path / "model.safetensors"))
    return from_quantized_state_dict(cfg, qsd, device, dtype, experts_device)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(model: Transformer, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens of ``tokens`` [N]
    (a minimal evaluator for comparing a model with its quantized copy)."""
    device = model.model.embed_tokens.weight.device
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"need more than {seq_len} tokens, got {tokens.numel()}")
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1: n * seq_len + 1].view(n, seq_len)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(x[i:i + batch_size].to(device)).float()
        total += F.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten().to(device),
                                 reduction="sum").item()
    return math.exp(total / (n * seq_len))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (quantized weights at their stored size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and not t.is_meta:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total

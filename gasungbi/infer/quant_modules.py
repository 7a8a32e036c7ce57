"""The quantized modules, the kernels they run, and the module swap that builds a quantized model
(the other half of :mod:`gasungbi.infer.quant`, which holds the maths and the state-dict transform).

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
On the CPU, int8 products of a few fp32 tokens run on the native kernels (:mod:`gasungbi.infer.native`).

Building. :func:`from_quantized_state_dict` builds the float model on the meta device, swaps in a
quantized module wherever the portable state dict holds quantized tensors (its portable tensors are
buffers under exactly those names), loads with ``load_state_dict(strict=True, assign=True)`` (a
missing or unexpected tensor is an error naming it), then each quantized module's
``prepare(device)`` turns its tensors into the kernel layout of its device. :func:`quantize` is the
state-dict transform followed by this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.infer import native
from gasungbi.infer.placement import offload_experts
from gasungbi.infer.quant import EXPERT_PROJS, portable_layout, quant_targets, quantize_state_dict, unpack_int4
from gasungbi.model.layers import MLP, swiglu
from gasungbi.model.moe import Experts, dispatch, expert_counts
from gasungbi.model.transformer import Transformer, build_model

_COMPUTE = torch.bfloat16


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
        self.s32 = None  # fp32 scales for the native CPU int8 kernel
        if mode == "int8":
            self.in_features = q.shape[1]
            self.w = _aligned(q.to(device))
            self.s = _aligned(scales.to(device, _COMPUTE))
            if not self.cuda:
                self.s32 = scales.to(device, torch.float32).contiguous()
        else:
            self.in_features = q.shape[1] * 2
            self.group_size = self.in_features // scales.shape[0]
            if self.cuda:
                tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
                self.w = torch._convert_weight_to_int4pack(q.to(device).contiguous(), tiles)
            else:
                self.w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).contiguous(), 2)
            self.s = scales.to(device, _COMPUTE).contiguous()

    def native(self, x: torch.Tensor) -> bool:
        """Whether ``x @ w.T`` runs on the native int8 kernel (CPU, a few fp32 tokens)."""
        return self.s32 is not None and native.usable(x, self.w)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype."""
        if self.native(x):
            return self.mm_native(x)
        return self.mm_compute(x.to(_COMPUTE)).to(x.dtype)

    def mm_native(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] fp32 -> [M, N] fp32 on the native int8 kernel (when :meth:`native` says so)."""
        return native.linear(x, self.w, self.s32)

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
        return [self.w, self.s] + ([self.s32] if self.s32 is not None else [])


def portable_buffers(module: nn.Module, name: str, shape: tuple[int, ...], mode: str, groups: int | None) -> None:
    """Register the portable tensors of a quantized float tensor ``name`` of ``shape`` [..., N, K] as
    empty persistent buffers, to be loaded: ``name`` (int8 [..., N, K] or uint8 [..., N, K/2]) and
    ``name_scales`` (fp32 [..., N] or [..., groups, N, 2])."""
    *lead, n, k = shape
    if mode == "int8":
        specs = ((shape, torch.int8), ((*lead, n), torch.float32))
    else:
        specs = (((*lead, n, k // 2), torch.uint8), ((*lead, groups, n, 2), torch.float32))
    for suffix, (size, dtype) in zip(("", "_scales"), specs):
        module.register_buffer(name + suffix, torch.empty(size, dtype=dtype, device="meta"))


def _kernel_buffers(module: nn.Module, weights: list[_Weight]) -> None:
    """Register the kernel-layout tensors as non-persistent buffers (seen by ``.device`` and memory
    accounting, not by ``state_dict``)."""
    for i, w in enumerate(weights):
        for j, t in enumerate(w.tensors()):
            module.register_buffer(f"_w{i}_{j}", t, persistent=False)


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear``: loads ``weight`` + ``weight_scales`` (portable), then
    :meth:`prepare` puts them in the kernel layout of a device, under the same names.

    The kernel layout is specific to the device it was prepared for: place the float model first
    (or pass ``device``/``experts_device`` to the loader), never ``.to()`` a quantized model."""

    def __init__(self, in_features: int, out_features: int, mode: str, groups: int | None = None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.mode, self.groups = in_features, out_features, mode, groups
        portable_buffers(self, "weight", (out_features, in_features), mode, groups)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self.qweight: _Weight | None = None

    def portable(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight, self.weight_scales

    def prepare(self, device: torch.device) -> None:
        self.qweight = _Weight(self.mode, *self.portable(), device)
        self.register_buffer("weight", self.qweight.w, persistent=False)
        self.register_buffer("weight_scales", self.qweight.s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.mm(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f", group_size={self.in_features // self.groups}" if self.mode == "int4" else ""
        return f"{self.in_features}, {self.out_features}, {self.mode}{g}"


def _fused(mode: str, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
           device: torch.device) -> tuple[list[_Weight], tuple[torch.Tensor, torch.Tensor]]:
    """Kernel-layout weights for gate and up stacked along the output, from portable (values, scales)
    of the same layout, [N, K] or [E, N, K] (then one weight per expert, views of one tensor), and
    the stacked (values, scales) themselves."""
    n_dim = -1 if mode == "int8" else -2  # N in scales [..., N] / [..., K/g, N, 2]
    q, s = torch.cat((gate[0], up[0]), dim=-2), torch.cat((gate[1], up[1]), dim=n_dim)
    if mode == "int8":
        q = _aligned(q.to(device))
    weights = [_Weight(mode, q, s, device)] if q.dim() == 2 else [_Weight(mode, qe, se, device) for qe, se in zip(q, s)]
    return weights, (q, s)


def _swiglu(gate_up: _Weight, down: _Weight, xc: torch.Tensor, native_path: bool = False,
            limit: float | None = None) -> torch.Tensor:
    """SwiGLU with gate and up fused into one matmul, all in the compute dtype: xc [n, d] -> [n, d];
    with ``native_path``, fp32 tokens on the native int8 kernel; ``limit``: DeepSeek-V4's clamp."""
    mm = _Weight.mm_native if native_path else _Weight.mm_compute
    gu = mm(gate_up, xc)  # (n, 2I)
    inter = gu.shape[-1] // 2
    return mm(down, swiglu(gu[:, :inter], gu[:, inter:], limit))


class QuantMLP(nn.Module):
    """A quantized SwiGLU ``MLP`` (dense layers, shared experts) with gate and up fused into one
    matmul; activations are cast to the compute dtype once on the way in and once on the way out.

    Loads the portable ``gate_proj``/``up_proj``/``down_proj`` (:class:`QuantLinear` holders); after
    :meth:`prepare` only the fused kernel-layout ``gate_up`` and ``down`` remain."""

    def __init__(self, dim: int, hidden: int, layouts: dict[str, tuple[str, int | None]],
                 limit: float | None = None):
        super().__init__()
        self.limit = limit
        self.gate_proj = QuantLinear(dim, hidden, *layouts["gate_proj"])
        self.up_proj = QuantLinear(dim, hidden, *layouts["up_proj"])
        self.down_proj = QuantLinear(hidden, dim, *layouts["down_proj"])

    def prepare(self, device: torch.device) -> None:
        [self.gate_up], _ = _fused(self.gate_proj.mode, self.gate_proj.portable(), self.up_proj.portable(), device)
        self.down = _Weight(self.down_proj.mode, *self.down_proj.portable(), device)
        del self.gate_proj, self.up_proj, self.down_proj
        _kernel_buffers(self, [self.gate_up, self.down])

    def native_tensors(self) -> list[torch.Tensor] | None:
        """[gate, up, down, their fp32 scales] for the native experts kernel (int8 on CPU), else None
        (also with a SwiGLU clamp, which the kernel does not apply)."""
        gu, down = self.gate_up, self.down
        if gu.s32 is None or down.s32 is None or self.limit is not None:
            return None
        inter = gu.w.shape[0] // 2
        return [gu.w[:inter], gu.w[inter:], down.w, gu.s32[:inter], gu.s32[inter:], down.s32]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        native_path = self.gate_up.native(flat) and self.down.s32 is not None
        y = _swiglu(self.gate_up, self.down, flat if native_path else flat.to(_COMPUTE), native_path, self.limit)
        return y.to(x.dtype).view(x.shape)


class QuantExperts(nn.Module):
    """Routed experts with quantized weights; the same sorted-by-expert loop as ``Experts``, with
    each expert's gate and up projections fused into one matmul. Tokens are cast to the compute
    dtype once for all experts; each expert's output is cast back before it is weighted and summed.

    Loads the portable stacked ``gate_proj``/``up_proj``/``down_proj`` and their ``_scales``; after
    :meth:`prepare` one kernel-layout ``gate_up[e]`` and ``down[e]`` per expert remain."""

    def __init__(self, n_experts: int, dim: int, inter: int, layouts: dict[str, tuple[str, int | None]],
                 limit: float | None = None):
        super().__init__()
        self.layouts, self.limit = layouts, limit
        shapes = {"gate_proj": (n_experts, inter, dim), "up_proj": (n_experts, inter, dim),
                  "down_proj": (n_experts, dim, inter)}
        for proj, shape in shapes.items():
            portable_buffers(self, proj, shape, *layouts[proj])

    def prepare(self, device: torch.device) -> None:
        gate, up, down = ((self._buffers.pop(p), self._buffers.pop(f"{p}_scales")) for p in EXPERT_PROJS)
        self.gate_up, (gu_q, gu_s) = _fused(self.layouts["gate_proj"][0], gate, up, device)
        down_mode = self.layouts["down_proj"][0]
        down_q = _aligned(down[0].to(device)) if down_mode == "int8" else down[0]
        self.down = [_Weight(down_mode, q, s, device) for q, s in zip(down_q, down[1])]
        _kernel_buffers(self, self.gate_up + self.down)
        self.stacked = None  # int8 on CPU: the stacked tensors of the native experts kernel (native.NativeMoE)
        if self.gate_up[0].s32 is not None and self.down[0].s32 is not None and self.limit is None:
            inter = gu_q.shape[1] // 2
            gu_s, down_s = gu_s.to(device, torch.float32), down[1].to(device, torch.float32)
            self.stacked = ((gu_q[:, :inter], gu_q[:, inter:], down_q),
                            (gu_s[:, :inter], gu_s[:, inter:], down_s.contiguous()))

    def native_tensors(self) -> list[torch.Tensor] | None:
        """The stacked [gate, up, down, their fp32 scales] for the native kernel (int8 on CPU), else None."""
        return None if self.stacked is None else [*self.stacked[0], *self.stacked[1]]

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        def expert(e: int, xc: torch.Tensor) -> torch.Tensor:
            return _swiglu(self.gate_up[e], self.down[e], xc, limit=self.limit).to(x.dtype)

        counts = expert_counts(idx, len(self.down), counts)
        return dispatch(expert, x.to(_COMPUTE), idx, weights, counts).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# module swap
# ---------------------------------------------------------------------------------------------

def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _swap_quantized(model: Transformer, qsd: dict[str, torch.Tensor]) -> list[str]:
    """Replace every module whose weights ``qsd`` holds quantized by its quantized module, with empty
    portable buffers to load; returns the names of the modules replaced."""
    swapped = []
    for name, mlp in [(n, m) for n, m in model.named_modules() if isinstance(m, MLP)]:
        layouts = {p: portable_layout(qsd, f"{name}.{p}.weight", getattr(mlp, p).weight.shape) for p in EXPERT_PROJS}
        if None in layouts.values():
            continue  # its quantized projections (if any) become QuantLinears below
        if layouts["gate_proj"] != layouts["up_proj"]:
            raise ValueError(f"{name}: gate_proj is {layouts['gate_proj']} but up_proj is {layouts['up_proj']}")
        _set_module(model, name, QuantMLP(mlp.gate_proj.in_features, mlp.gate_proj.out_features, layouts, mlp.limit))
        swapped.append(name)
    linears, experts = quant_targets(model)  # after the MLP swap: their projections are no nn.Linear now
    for name in linears:
        lin = model.get_submodule(name)
        layout = portable_layout(qsd, f"{name}.weight", lin.weight.shape)
        if layout is not None:
            _set_module(model, name, QuantLinear(lin.in_features, lin.out_features, *layout, lin.bias is not None))
            swapped.append(name)
    for name in experts:
        ex = model.get_submodule(name)
        layouts = {p: portable_layout(qsd, f"{name}.{p}", getattr(ex, p).shape) for p in EXPERT_PROJS}
        known = [v for v in layouts.values() if v is not None]
        if not known:
            continue
        layouts = {p: v or known[0] for p, v in layouts.items()}  # a float one: the strict load names it
        if layouts["gate_proj"] != layouts["up_proj"]:
            raise ValueError(f"{name}: gate_proj is {layouts['gate_proj']} but up_proj is {layouts['up_proj']}")
        E, inter, dim = ex.gate_proj.shape
        _set_module(model, name, QuantExperts(E, dim, inter, layouts, ex.limit))
        swapped.append(name)
    return swapped


def from_quantized_state_dict(cfg: ModelConfig, qsd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                              dtype: torch.dtype = torch.float32,
                              experts_device: str | torch.device | None = None,
                              consume: bool = False) -> Transformer:
    """Build the model with quantized modules from a portable state dict, on ``device`` (routed
    experts on ``experts_device`` when given; see :mod:`gasungbi.infer.placement`): the float model
    on the meta device, the module swap, one strict ``load_state_dict``, then each quantized module
    prepared for its device. ``ValueError`` naming the tensors when ``qsd`` does not fit ``cfg``.
    ``consume``: empty ``qsd`` once loaded, so each module's portable tensors are freed as it is
    prepared (the quantized model is then in memory once, not in both layouts)."""
    device = torch.device(device)
    exp_device = torch.device(experts_device) if experts_device is not None else device
    model = build_model(cfg, device="meta")
    swapped = _swap_quantized(model, qsd)
    expected = model.state_dict()
    for k, v in qsd.items():
        e = expected.get(k)
        if e is not None and (v.dtype != e.dtype if not e.is_floating_point() else not v.is_floating_point()):
            raise ValueError(f"{k} is {v.dtype}, expected {e.dtype if not e.is_floating_point() else 'floating point'}")
    portable = {f"{n}.{b}" for n in swapped for b, _ in model.get_submodule(n).named_buffers()}
    experts = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, (Experts, QuantExperts)))

    def place(k: str, v: torch.Tensor) -> torch.Tensor:
        if k in portable:
            return v  # prepare() moves it, in its kernel layout
        dev = exp_device if k.startswith(experts) else device
        return v.to(dev, dtype) if v.is_floating_point() else v.to(dev)

    placed = {k: place(k, v) for k, v in qsd.items()}
    if consume:
        qsd.clear()
    try:
        model.load_state_dict(placed, strict=True, assign=True)
        del placed
    except RuntimeError as e:  # "Error(s) in loading state_dict ...:\n\tMissing key(s) ...\n\tUnexpected ..."
        why = " ".join(str(e).split("\n\t")[1:]).strip() or str(e)
        raise ValueError(f"the quantized state dict does not match the config: {why}") from None
    for name in swapped:
        m = model.get_submodule(name)
        m.prepare(exp_device if isinstance(m, QuantExperts) else device)
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

"""Native CPU decode kernels (``native.cpp``), built at first use and cached, with PyTorch as fallback.

A decode step multiplies a few token vectors by every weight matrix: the time is spent reading the
weights, and PyTorch's CPU GEMM reads skinny products far below the memory's speed (see the C++
file's header). :func:`accelerate` is a pass over a model that routes its small-batch inference
products to the native kernels; training, large batches, CUDA and tensors of other dtypes keep the
PyTorch path, which stays the reference the tests compare against.

The extension is compiled by ``torch.utils.cpp_extension`` (needs a C++ compiler and ninja, both
installed with the package's dependencies on Linux) with ``-march=native`` into torch's extension
cache, under a name keyed by the CPU's instruction-set flags (:func:`extension_name`), so a cache
shared between machines never runs code built for another instruction set (two AVX-512 CPUs, one
without VNNI, get two builds). Set ``GASUNGBI_NATIVE=0`` to turn it off; a failed build warns once
and falls back.
"""

from __future__ import annotations

import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gasungbi.model.attention import MLA
from gasungbi.model.moe import Experts, MoE, Router

SOURCE = Path(__file__).with_name("native.cpp")
MAX_TOKENS = 16
"""Up to this many tokens per product the native kernels run (decode steps, small batches); more
(prefill, training) go to PyTorch's GEMM, which wins once the product is compute-bound."""


_built: bool | None = None  # the outcome of the build (a plain global: torch.compile traces available())


def available() -> bool:
    """Build (once per source version and machine) and load the kernels; False when turned off or
    when the build fails (with a warning naming why)."""
    global _built
    if _built is None:
        _built = _build()
    return _built


def _build() -> bool:
    if os.environ.get("GASUNGBI_NATIVE", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(extension_name(cpu_flags()), [str(SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: use PyTorch
        warnings.warn(f"gasungbi's native CPU kernels could not be built ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); decoding uses PyTorch's "
                      f"kernels (slower). Set GASUNGBI_NATIVE=0 to silence this.", stacklevel=2)
        return False
    _register_fakes()
    return True


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's feature flags, sorted: the ``flags`` (x86) or ``Features`` (ARM) line of
    ``cpuinfo``, which names the instruction sets ``-march=native`` builds for (and a few flags
    that are not instruction sets: at worst a needless rebuild). Where the file is absent or has
    no such line (not Linux), the processor's name and torch's CPU capability stand in."""
    try:
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("flags", "Features"):
                return sorted(set(value.split()))
    except OSError:
        pass
    return [platform.processor() or "unknown", torch.backends.cpu.get_cpu_capability().lower()]


def extension_name(flags: list[str], source: bytes | None = None) -> str:
    """The build's name in torch's extension cache: the architecture, torch's CPU capability, and
    hashes of the instruction-set ``flags`` and of the ``source`` (native.cpp's by default), so that
    a cache shared between machines or source versions never loads a binary built for another."""
    isa = hashlib.sha1(" ".join(sorted(set(flags))).encode()).hexdigest()[:10]
    tag = hashlib.sha1(SOURCE.read_bytes() if source is None else source).hexdigest()[:10]
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return f"gasungbi_native_{platform.machine()}_{cap}_{isa}_{tag}"


def _register_fakes() -> None:
    """Shapes for torch.compile: the ops are opaque to it but their outputs are known."""
    @torch.library.register_fake("gasungbi::linear")
    def _(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("gasungbi::experts")
    def _(x, routed, shared, idx, weights):
        return x.new_empty(x.shape)

    @torch.library.register_fake("gasungbi::mla_attend")
    def _(q_nope, q_pe, kv, k_pe, w_uk, w_uv, mask, scale):
        return q_nope.new_empty(*q_nope.shape[:3], w_uv.shape[1])


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a product of ``x`` [M, K] with ``weights`` goes native: inference, CPU, fp32 tokens,
    at most :data:`MAX_TOKENS` of them, plain (not distributed) fp32 or int8 weights on the CPU."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= MAX_TOKENS
            and all(w.device.type == "cpu" for w in weights)
            and not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)))
            and all(type(w) in (torch.Tensor, nn.Parameter) and w.dtype in (torch.float32, torch.int8)
                    for w in weights)
            and available())


def q8_activations() -> bool:
    """Whether int8 products quantize their tokens per block of 32 to int8 (the AVX512-VNNI path,
    llama.cpp's Q8_0 arithmetic) rather than multiply fp32 tokens by the int8 weights."""
    return bool(torch.ops.gasungbi.q8_activations())


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (x scale[N] for int8 w) -> [M, N] fp32."""
    return torch.ops.gasungbi.linear(x, w, scale)


def experts(x: torch.Tensor, routed: list[torch.Tensor], shared: list[torch.Tensor], idx: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE's FFN for a few tokens (see native.cpp): x [M, d]; ``routed`` stacked [gate
    [E, I, d], up [E, I, d], down [E, d, I]] (+ their scales for int8), ``shared`` the same for the
    shared expert unstacked, or []; idx/weights [M, K] -> [M, d] fp32."""
    return torch.ops.gasungbi.experts(x, routed, shared, idx, weights)


class NativeLinear(nn.Linear):
    """An ``nn.Linear`` whose small-batch inference products run natively (same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if not usable(flat, self.weight):
            return F.linear(x, self.weight, self.bias)
        y = linear(flat, self.weight).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def moe_tensors(moe: MoE) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The routed and shared experts' tensors as the native kernel takes them (fp32, or int8 with
    fp32 scales: quantized modules say through ``native_tensors()``), or None when they are in
    another form (int4, mixed, distributed)."""
    ex, sh = moe.experts, moe.shared_experts
    if type(ex) is Experts:
        routed = [ex.gate_proj, ex.up_proj, ex.down_proj]
    else:
        routed = ex.native_tensors() if hasattr(ex, "native_tensors") else None
    if sh is None:
        shared = []
    elif hasattr(sh, "native_tensors"):
        shared = sh.native_tensors()
    elif all(type(getattr(sh, p)) in (nn.Linear, NativeLinear) for p in ("gate_proj", "up_proj", "down_proj")):
        shared = [sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight]
    else:  # projections with more than a weight (LoRA adapters): their own forward
        return None
    if routed is None or shared is None or any(t.dtype != routed[0].dtype for t in shared[:3]):
        return None
    return routed, shared


class NativeMoE(MoE):
    """A DeepSeekMoE layer whose few-token inference (router in PyTorch, then every chosen and
    shared expert in one native call) skips the sorted dispatch; same parameters."""

    def forward(self, x: torch.Tensor, *, stats=None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        tensors = moe_tensors(self) if stats is None else None
        if tensors is None or not usable(flat, *tensors[0], *tensors[1]):
            return super().forward(x, stats=stats)
        weights, idx, _ = self.gate(flat)
        return experts(flat, *tensors, idx, weights).view(x.shape)


class NativeRouter(Router):
    """A router whose few-token affinities (x W^T, fp32) run natively; same parameters."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or not usable(x, self.weight):
            return super().logits(x)
        return linear(x, self.weight)


class NativeMLA(MLA):
    """MLA whose absorbed attention (decode steps, given a mask) runs in one native call instead of
    four batched matmuls, a mask and a softmax; same parameters, the PyTorch path otherwise."""

    def _absorbed(self, q_nope, q_pe, kv, k_pe, w_uk, w_uv, start_pos: int, mask) -> torch.Tensor:
        tensors = (q_nope, q_pe, kv, k_pe, w_uk)
        if (mask is None or mask.dtype != torch.bool or not available()
                or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return super()._absorbed(q_nope, q_pe, kv, k_pe, w_uk, w_uv, start_pos, mask)
        return torch.ops.gasungbi.mla_attend(q_nope, q_pe, kv, k_pe, w_uk, w_uv, mask, self.scale)


def accelerate(model: nn.Module) -> nn.Module:
    """Route ``model``'s small-batch inference products to the native kernels, in place: every
    ``nn.Linear`` becomes a :class:`NativeLinear`, every MoE layer a :class:`NativeMoE` (its router
    a :class:`NativeRouter`) and every MLA a :class:`NativeMLA` (same parameters and state dict;
    other inputs take the PyTorch path). Returns the
    model; a no-op when the kernels are unavailable."""
    if not available():
        return model
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = NativeLinear
        elif type(m) is MoE:
            m.__class__ = NativeMoE
        elif type(m) is MLA:
            m.__class__ = NativeMLA
        elif type(m) is Router:
            m.__class__ = NativeRouter
    return model

"""What serving a model takes: where each part lives, whether it fits, its decode and prefill
ceilings and its cost, on GPUs, DRAM platforms or both (KTransformers' hybrid split).

* **Decode ceiling**: at batch 1 each decoded token reads the activated weights (attention,
  dense and shared FFNs, router, output head, one embedding row, K_r of N_r routed experts per MoE
  layer) plus the KV cache of the context. A layer's parts run one after another, so the time per
  step is the *sum* over memories of bytes_read / bandwidth, at the theoretical bandwidth: a
  ceiling, not a prediction. At batch B the step reads the weights once, the routed experts that
  any of the B tokens chose (expected fraction 1 - (1 - K_r/N_r)^B under uniform routing) and B
  KV caches, and yields B tokens.
* **Prefill ceiling**: forward FLOPs per prompt token (2 x activated non-embedding parameters +
  attention forward at the full context) over the dense peak of the device holding each part.

Bytes per weight and per cached token follow :mod:`gasungbi.plan.counts`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gasungbi.model.accounting import attention_flops_per_token, count_params
from gasungbi.plan.catalog import Gpu, Hardware, MemoryPlatform
from gasungbi.plan.counts import CountModel, Model, kv_bytes_per_token, quant_bits

GPU_USABLE = 0.90
"""Fraction of GPU memory the weights and KV cache may use (the rest: CUDA context, activations,
fragmentation)."""
DDR_RESERVE_GB = 8.0
"""DRAM kept for the OS and the runtime, per platform."""
AMORTIZE_HOURS = 3 * 8760
"""Owned hardware (the DDR platforms) is paid off over 3 years running 24/7; power is not counted.
GPUs are always priced at their catalog rental rate."""
DEFAULT_GPU = "h200"
DEFAULT_MEMORY = "ddr5-12ch-5600"
"""The comparison fills in an all-HBM or DDR set-up with these when ``--hardware`` names none."""


@dataclass
class Setup:
    """Where the model runs: ``gpu_count`` x ``gpu`` and/or ``memory_count`` x ``memory``."""

    label: str
    gpu: Gpu | None = None
    gpu_count: int = 0
    memory: MemoryPlatform | None = None
    memory_count: int = 0
    ddr_gb: float | None = None  # per platform; None = the catalog's memory_gb

    @property
    def kind(self) -> str:
        return "CPU-only" if self.gpu is None else "all-HBM" if self.memory is None else "hybrid"

    def describe(self) -> str:
        parts = []
        if self.gpu:
            parts.append(f"{self.gpu_count}x {self.gpu.key}")
        if self.memory:
            parts.append(f"{self.memory_count}x {self.memory.key} ({self.memory_gb:.0f} GB)")
        return " + ".join(parts)

    @property
    def memory_gb(self) -> float:
        return self.ddr_gb if self.ddr_gb is not None else self.memory.memory_gb

    def cost_per_hour(self) -> float:
        """GPUs at their rental rate; DRAM platforms (board, CPU and memory) bought and paid off
        over :data:`AMORTIZE_HOURS`."""
        cost = 0.0
        if self.gpu:
            cost += self.gpu_count * self.gpu.price_per_hour
        if self.memory:
            owned = self.memory.platform_price + self.memory_gb * self.memory.price_per_gb
            cost += self.memory_count * owned / AMORTIZE_HOURS
        return cost

    def placement(self) -> dict[str, str]:
        """Part -> "gpu" or "ddr". Hybrid (KTransformers' split): routed experts and the embedding
        table (a lookup reads one row) in DRAM; attention, dense and shared FFNs, router, norms,
        output head and the KV cache on the GPU (DeepSeek-V4's compressors, indexer and hyper-connections
        with the attention)."""
        parts = ("embedding", "attention", "norms", "dense_ffn", "shared_experts", "router",
                 "routed_experts", "output_head", "kv_cache", "compressors", "indexer", "hyper_connections")
        if self.kind == "all-HBM":
            return {p: "gpu" for p in parts}
        if self.kind == "CPU-only":
            return {p: "ddr" for p in parts}
        return {p: "ddr" if p in ("routed_experts", "embedding") else "gpu" for p in parts}


@dataclass
class ServeEstimate:
    """Fit, decode and prefill ceilings and cost of serving one model on one set-up."""

    setup: str
    kind: str
    quant: str
    bits_per_weight: float
    context: int
    batch: int
    placement: dict[str, str]
    parts_gb: dict[str, float]
    stored_gb: dict[str, float]
    capacity_gb: dict[str, float]
    fits: bool
    read_gb_per_step: dict[str, float]
    decode_tokens_per_s: float
    prefill_tokens_per_s: float | None
    cost_per_hour: float
    usd_per_million_tokens: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _serve_parts(model: Model, quant: str, context: int, batch: int) -> tuple[dict, dict, dict, float]:
    """Per part: bytes stored, bytes read per decode step, FLOPs per decode step; and the forward
    FLOPs of one prompt token (prefill). A :class:`CountModel` is one part, ``weights``: a step
    reads ``active`` at batch 1 and at most min(params, batch x active) at batch B (which share of
    the weights is shared and which routed is unknown)."""
    bits = quant_bits(quant)
    if isinstance(model, CountModel):
        kv = batch * context * model.kv_bytes_per_token
        attn = model.attention_flops(context)
        stored = {"weights": model.params * bits / 8, "kv_cache": kv}
        read = {"weights": min(model.params, batch * model.active) * bits / 8, "kv_cache": kv}
        flops = {"weights": batch * 2 * model.active, "kv_cache": batch * attn}
        return stored, read, flops, 2 * model.active + attn
    cfg = model
    pc = count_params(cfg)
    comps = {k: v for k, v in pc.components.items() if v}
    touched = 1 - (1 - pc.routed_fraction) ** batch if "routed_experts" in comps else 1.0
    stored = {part: n * bits / 8 for part, n in comps.items()}
    read = {}
    for part, n in comps.items():
        if part == "embedding":
            read[part] = batch * cfg.hidden_size * bits / 8
        elif part == "routed_experts":
            read[part] = n * bits / 8 * touched
        else:
            read[part] = n * bits / 8
    kv = batch * context * kv_bytes_per_token(cfg, context=context or None)
    stored["kv_cache"] = read["kv_cache"] = kv
    # FLOPs: 2 per activated weight per token, and the attention over the context (read from the cache)
    flops = {part: batch * 2 * (n * pc.routed_fraction if part == "routed_experts" else n)
             for part, n in comps.items() if part != "embedding"}
    flops["kv_cache"] = batch * attention_flops_per_token(cfg, context)
    prefill = 2 * (pc.activated - comps["embedding"]) + attention_flops_per_token(cfg, context)
    return stored, read, flops, prefill


def estimate_serve(cfg: Model, setup: Setup, quant: str, context: int = 4096, batch: int = 1) -> ServeEstimate:
    """Where each part lives, whether it fits, and the decode/prefill ceilings (see the module docstring).

    The decode step takes the longer of its memory time (sum over memories of bytes read /
    bandwidth) and its compute time (sum over devices of FLOPs / dense peak; a memory platform
    without a ``tflops`` figure adds none): a roofline, which matters only at large batches."""
    bits = quant_bits(quant)
    parts, reads, flops, prefill_flops = _serve_parts(cfg, quant, context, batch)
    place = setup.placement()
    if isinstance(cfg, CountModel):
        if setup.kind == "hybrid":
            raise ValueError("a hybrid GPU + DDR placement needs the architecture (which parts are experts): "
                             "pass --model instead of --params/--active")
        place = {p: place["attention"] for p in parts}
    stored = {"gpu": 0.0, "ddr": 0.0}
    read = {"gpu": 0.0, "ddr": 0.0}
    work = {"gpu": 0.0, "ddr": 0.0}
    for part in parts:
        stored[place[part]] += parts[part]
        read[place[part]] += reads[part]
        work[place[part]] += flops.get(part, 0.0)

    bandwidth, capacity, peak = _memories(setup, quant)
    memory_time = sum(read[mem] / bandwidth[mem] for mem in bandwidth)
    compute_time = sum(work[mem] / peak[mem] for mem in bandwidth if peak.get(mem))
    decode = batch / max(memory_time, compute_time)

    prefill = _prefill_rate(cfg, place, peak, prefill_flops)
    cost = setup.cost_per_hour()
    fits = all(stored[mem] <= capacity.get(mem, 0.0) for mem in stored if stored[mem])
    notes = [] if fits else [f"does not fit: {mem} needs {stored[mem] / 1e9:,.1f} GB, has "
                             f"{capacity.get(mem, 0) / 1e9:,.1f} GB usable" for mem in stored
                             if stored[mem] > capacity.get(mem, 0.0)]
    gb = lambda d: {k: v / 1e9 for k, v in d.items() if k in bandwidth}  # noqa: E731
    if setup.kind == "all-HBM" and setup.gpu_count > 1:
        notes.append(f"the ceiling assumes the {setup.gpu_count} GPUs split every layer with a free interconnect")
    if compute_time > memory_time:
        notes.append(f"compute-bound at batch {batch}: {compute_time * 1e3:,.2f} ms of FLOPs against "
                     f"{memory_time * 1e3:,.2f} ms of memory reads per step")
    return ServeEstimate(setup.describe(), setup.kind, quant, bits, context, batch, place,
                         {k: v / 1e9 for k, v in parts.items()}, gb(stored), gb(capacity),
                         fits, gb(read), decode, prefill, cost, cost / (decode * 3600) * 1e6, notes)


def _memories(setup: Setup, quant: str) -> tuple[dict[str, float], dict[str, float], dict[str, float | None]]:
    """Per memory of ``setup`` (``gpu``, ``ddr``): bandwidth in bytes/s, usable capacity in bytes
    (less :data:`GPU_USABLE` or :data:`DDR_RESERVE_GB`), and the dense peak in FLOP/s of the devices
    that compute on it (FP8 for ``fp8`` weights where the GPU has it; None for a DRAM platform
    without a ``tflops`` figure)."""
    bandwidth, capacity, peak = {}, {}, {}
    if setup.gpu:
        g, n = setup.gpu, setup.gpu_count
        bandwidth["gpu"] = g.bandwidth_gbs * 1e9 * n
        capacity["gpu"] = g.memory_gb * 1e9 * GPU_USABLE * n
        peak["gpu"] = (g.fp8_tflops if quant == "fp8" and g.fp8_tflops else g.bf16_tflops) * 1e12 * n
    if setup.memory:
        m, n = setup.memory, setup.memory_count
        bandwidth["ddr"] = m.bandwidth_gbs * 1e9 * n
        capacity["ddr"] = max(setup.memory_gb - DDR_RESERVE_GB, 0) * 1e9 * n
        peak["ddr"] = m.tflops * 1e12 * n if m.tflops else None
    return bandwidth, capacity, peak


def _prefill_rate(cfg: Model, place: dict[str, str], peak: dict[str, float | None],
                  prefill_flops: float) -> float | None:
    """Prompt tokens/s at the dense peaks: the routed experts' FLOPs on the devices of their memory,
    the rest on those of the attention's; None when a device doing some of the work has no peak."""
    if isinstance(cfg, CountModel):
        mem = place["weights"]
        return peak[mem] / prefill_flops if peak.get(mem) else None
    pc = count_params(cfg)
    routed_act = pc.components.get("routed_experts", 0) * pc.routed_fraction
    pwork = {"gpu": 0.0, "ddr": 0.0}
    pwork[place["routed_experts"]] += 2 * routed_act
    pwork[place["attention"]] += prefill_flops - 2 * routed_act
    if all(peak.get(mem) for mem, w in pwork.items() if w):
        return 1 / sum(w / peak[mem] for mem, w in pwork.items() if w)
    return None


def compare_setups(cfg: Model, hw: Hardware, quant: str, context: int = 4096, batch: int = 1,
                   ddr_gb: float | None = None, default_gpu: Gpu | None = None,
                   default_memory: MemoryPlatform | None = None) -> list[ServeEstimate]:
    """The requested set-up plus its all-HBM, hybrid and CPU-only alternatives (same GPU type and
    DRAM platform; defaults fill in what ``hw`` lacks). The all-HBM alternative uses the fewest
    GPUs that hold everything; the requested one is first."""
    gpu, mem = hw.gpu or default_gpu, hw.memory or default_memory
    requested = Setup("requested", hw.gpu, hw.gpu_count, hw.memory, hw.memory_count, ddr_gb)
    one = estimate_serve(cfg, Setup("probe", gpu, 1), quant, context, batch)
    need = math.ceil(one.stored_gb["gpu"] / one.capacity_gb["gpu"])
    alternatives = [Setup("all-HBM", gpu, max(need, 1)),
                    Setup("hybrid", gpu, hw.gpu_count or 1, mem, hw.memory_count or 1, ddr_gb),
                    Setup("CPU-only", None, 0, mem, hw.memory_count or 1, ddr_gb)]
    if isinstance(cfg, CountModel):  # no architecture: no hybrid split
        alternatives = [s for s in alternatives if s.kind != "hybrid"]
    out = [estimate_serve(cfg, requested, quant, context, batch)]
    for s in alternatives:
        if s.describe() != requested.describe():
            out.append(estimate_serve(cfg, s, quant, context, batch))
    return out

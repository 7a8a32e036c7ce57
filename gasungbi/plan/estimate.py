"""Training cost and serving speed, computed from a ModelConfig and catalog entries.

All parameter and FLOP counts come from :mod:`gasungbi.model.accounting`; this module only turns
them into bytes, seconds and dollars. Conventions, stated once:

* **Bits per weight** (``QUANT_BITS``): every parameter of the served model (main model, no MTP
  modules) is stored at the format's average bits per weight, norms and router included (they are
  under 0.1% of a large model). ``int8`` = 8 bits with per-channel scales (their bytes are
  negligible); ``q8_0`` = llama.cpp Q8_0, blocks of 32 int8 + one fp16 scale = 8.5 bpw;
  ``int4`` = 4-bit groups of 32 with one fp16 scale = 4 + 16/32 = 4.5 bpw (as llama.cpp Q4_0 and
  the group-wise int4 of GPTQ/AWQ with group 32); ``q4_k_m`` = llama.cpp's Q4_K_M mix (Q4_K at
  4.5 bpw, some tensors at Q6_K's 6.56) averaging about 4.85 bpw: 671B parameters at 4.85 bpw are
  407 GB, close to the published DeepSeek-R1 Q4_K_M files.
* **KV cache**: bf16 (2 bytes) per element unless stated. MLA stores (kv_lora_rank +
  qk_rope_head_dim) x layers per token (what ``gasungbi.infer.cache.KVCache`` allocates). The "MHA equivalent" of an
  MLA model caches full per-head keys (qk_nope + qk_rope = qk_head_dim wide) and values
  (v_head_dim wide): heads x (qk_head_dim + v_head_dim) x layers. (DeepSeek-V2 Table 1 uses
  2 x heads x d_h x layers with d_h = 128, i.e. without the RoPE part of the key.)
* **Training FLOPs per token**: ``training_flops_per_token`` (6 x activated non-embedding
  parameters + 3 x attention forward, PaLM Appendix B, full T x T, MTP included when present).
  **MFU** is relative to the dense peak of the precision the GEMMs ran in (BF16, or FP8 with
  ``precision="fp8"``); a BF16 run and an FP8 run of the same model differ by
  :data:`FP8_TRAINING_SPEEDUP`, not by the 2x of the peaks.
* **Decode ceiling**: at batch 1 each decoded token reads the activated weights (attention,
  dense and shared FFNs, router, output head, one embedding row, K_r of N_r routed experts per MoE
  layer) plus the KV cache of the context. A layer's parts run one after another, so the time per
  step is the *sum* over memories of bytes_read / bandwidth, at the theoretical bandwidth: a
  ceiling, not a prediction. At batch B the step reads the weights once, the routed experts that
  any of the B tokens chose (expected fraction 1 - (1 - K_r/N_r)^B under uniform routing) and B
  KV caches, and yields B tokens.
* **Expert-parallel all-to-all** (``estimate_expert_parallel``): hidden-vector copies per token and
  MoE layer across nodes and within one, from uniform expert placement (stated in its docstring),
  at the catalog's per-GPU network and NVLink figures, against the GPU-seconds of the same tokens.
* **Prefill ceiling**: forward FLOPs per prompt token (2 x activated non-embedding parameters +
  attention forward at the full context) over the dense peak of the device holding each part.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gasungbi.config import ModelConfig
from gasungbi.model.accounting import attention_flops_per_token, count_params, training_flops_per_token
from gasungbi.plan.catalog import Gpu, Hardware, MemoryPlatform

QUANT_BITS: dict[str, float] = {
    "fp32": 32.0,   # our CPU engine's default
    "bf16": 16.0,
    "fp8": 8.0,     # DeepSeek's e4m3 with 128x128 block scales: +0.002 bpw, ignored
    "int8": 8.0,    # per-channel scales, ignored
    "q8_0": 8.5,    # llama.cpp Q8_0: 32 x int8 + fp16 scale
    "int4": 4.5,    # groups of 32 x int4 + fp16 scale
    "q4_k_m": 4.85, # llama.cpp Q4_K_M mix (Q4_K 4.5 bpw + some Q6_K 6.56 bpw)
}


def quant_bits(quant: str) -> float:
    """Bits per weight of ``quant``; ``ValueError`` listing the known formats otherwise."""
    try:
        return QUANT_BITS[quant.lower()]
    except KeyError:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_BITS)}") from None


def parse_tokens(text: str) -> float:
    """``"14.8T"``, ``"500B"``, ``"2M"``, ``"10k"``, ``"1e9"`` or ``"1000"`` -> a token count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)(e[+-]?\d+)?\s*([kmgbt]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot parse token count {text!r}; write a number with an optional "
                         "K/M/B/T suffix, e.g. 14.8T, 500B, 2M")
    value = float(m.group(1) + (m.group(2) or "")) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9,
                                                        "t": 1e12}[m.group(3)]
    if value <= 0:
        raise ValueError(f"token count must be positive, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Model accounting: parameters, weight bytes, KV bytes, FLOPs
# ---------------------------------------------------------------------------------------------

@dataclass
class CountModel:
    """A model known by its counts alone (``--params N --active N``, or a published run whose
    architecture has no config here).

    ``params`` are all stored weights; ``active`` the parameters one token's matmuls use (training
    FLOPs are 6 x active; the embedding's share is not subtracted unless the counts already leave it
    out). Attention FLOPs are counted only when ``layers`` and ``attention_width`` (heads x head
    width) are given, over ``attention_context`` tokens (the mean attended span: a sliding window's
    size; ``None`` = the sequence length): 3 x 2 x layers x 2 x width x context per token (PaLM
    Appendix B, the same convention as ``attention_flops_per_token``). The KV cache is
    ``kv_bytes_per_token`` (0 = not counted).
    """

    params: float
    active: float
    layers: int = 0
    attention_width: int = 0
    attention_context: int | None = None
    kv_bytes_per_token: int = 0

    def __post_init__(self) -> None:
        if not (self.params > 0 and 0 < self.active <= self.params):
            raise ValueError(f"need params > 0 and 0 < active <= params, got params={self.params:g}, "
                             f"active={self.active:g}")

    def attention_flops(self, context: int) -> float:
        """Forward attention FLOPs per token at ``context`` (capped by ``attention_context``)."""
        span = context if self.attention_context is None else min(context, self.attention_context)
        return 4 * self.layers * self.attention_width * span


Model = ModelConfig | CountModel


def flops_per_token(model: Model, seq_len: int) -> float:
    """Training FLOPs per token: ``training_flops_per_token`` for an architecture, else 6 x active
    + 3 x attention forward (see :class:`CountModel`)."""
    if isinstance(model, CountModel):
        return 6 * model.active + 3 * model.attention_flops(seq_len)
    return training_flops_per_token(model, seq_len)


def kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2) -> int:
    """KV cache bytes per token of the main model: MLA caches the latent and the shared RoPE key,
    (kv_lora_rank + qk_rope_head_dim) x layers; GQA caches K and V, 2 x kv_heads x head_dim x layers."""
    if cfg.is_mla:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        width = 2 * cfg.gqa_kv_heads * cfg.gqa_head_dim
    return width * cfg.num_hidden_layers * elem_bytes


def mha_kv_bytes_per_token(cfg: ModelConfig, elem_bytes: int = 2) -> int:
    """KV bytes per token of a plain multi-head attention model of the same shape (see module doc)."""
    if cfg.is_mla:
        width = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        width = 2 * cfg.num_attention_heads * cfg.gqa_head_dim
    return width * cfg.num_hidden_layers * elem_bytes


def model_accounting(cfg: ModelConfig, seq_len: int = 4096) -> dict[str, Any]:
    """Parameters per component (total and activated), weight bytes per format, KV bytes per
    token (this model vs the MHA equivalent) and training FLOPs per token."""
    pc = count_params(cfg)
    comps = {k: {"total": v, "activated": round(v * pc.routed_fraction) if k == "routed_experts" else v}
             for k, v in pc.components.items()}
    return {
        "components": comps,
        "total": pc.total,
        "activated": pc.activated,
        "mtp_total": pc.mtp_total,
        "weight_bytes": {q: {"total": pc.total * b / 8, "activated": pc.activated * b / 8}
                         for q, b in QUANT_BITS.items()},
        "bits_per_weight": dict(QUANT_BITS),
        "kv_bytes_per_token_bf16": {"this_model": kv_bytes_per_token(cfg), "mha_equivalent": mha_kv_bytes_per_token(cfg)},
        "training_flops_per_token": training_flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

DEEPSEEK_V3 = {
    # DeepSeek-V3 technical report (arXiv:2412.19437), Table 1 and Sec. 4.2.
    "tokens": 14.8e12, "seq_len": 4096, "hardware": "h800", "count": 2048, "price_per_hour": 2.0,
    "pretrain_gpu_hours": 2.664e6, "context_extension_gpu_hours": 0.119e6, "post_training_gpu_hours": 0.005e6,
    "total_gpu_hours": 2.788e6, "pretrain_usd": 5.328e6, "total_usd": 5.576e6,
}

CALIBRATED_FP8_MFU = 0.2274
"""The MFU DeepSeek-V3's pretraining figure implies under our FLOP count, against the FP8 peak its
GEMMs ran at: the default MFU of ``precision="fp8"``.

14.8T tokens x 291.85 GFLOP/token (``training_flops_per_token`` of the 671B preset at 4096 tokens,
MTP included) = 4.32e24 FLOPs, done in 2.664M H800-hours: 4.50e14 FLOP/s per GPU = 22.7% of the
H800's 1,979 dense FP8 TFLOPS (45.5% of its 989 dense BF16 TFLOPS). ``implied_mfu`` recomputes it;
``tests/test_plan.py`` checks the two agree.
"""

FP8_TRAINING_SPEEDUP = 1.43
"""How much faster FP8 training runs than BF16 on the same GPUs, end to end: the middle of the
1.34-1.51x torchao publishes for Llama 3.1 pre-training on H100 clusters (pytorch/ao README: "1.43-1.51x
faster pre-training on Llama-3.1-70B and 405B using float8 training"; "Float8 rowwise training yielded
1.34-1.43x training speedup at 2k H100 GPU scale"). Not the 2x of the peaks: attention, norms, the
scaling casts and communication stay in BF16. DeepSeek publishes no BF16 baseline of its own."""

CALIBRATED_MFU = 0.318
"""Default MFU of a BF16 run, against the BF16 peak: DeepSeek-V3's 45.5% of the BF16 peak, reached
with FP8 GEMMs, over :data:`FP8_TRAINING_SPEEDUP` (0.455 / 1.43). DeepSeek-V2, an MoE trained in
BF16 on H800s, implies 30.2% (172.8K GPU-hours per trillion tokens; ``gasungbi plan backtest``)."""


CALIBRATED_DENSE_MFU = 0.382
"""Default MFU of a dense BF16 run (no routed experts), against the BF16 peak: what Llama 3.1 405B's
30.84M H100-hours imply under our FLOP count (15.6T tokens, the long-context stages included:
``published.json``), inside the 38-43% the Llama 3 paper reports for that run (arXiv:2407.21783,
Table 4). ``gasungbi plan backtest`` recomputes it as its ``train_dense`` constant and predicts the
other dense runs with it; ``tests/test_plan.py`` checks the two agree.
The MoE default (:data:`CALIBRATED_MFU`) is lower: routed experts are smaller matmuls, with all-to-all."""


def is_moe(model: Model) -> bool:
    """A mixture-of-experts model: routed experts, or, known by its counts alone, fewer activated
    parameters than stored ones."""
    if isinstance(model, CountModel):
        return model.active < model.params
    return model.n_routed_experts > 0


def implied_mfu(cfg: Model, tokens: float, gpu_hours: float, peak_tflops: float, seq_len: int) -> float:
    """The MFU at which ``tokens`` of training take ``gpu_hours`` on GPUs of ``peak_tflops``."""
    return tokens * flops_per_token(cfg, seq_len) / (gpu_hours * 3600 * peak_tflops * 1e12)


@dataclass
class TrainEstimate:
    """GPU-hours, wall-clock days and dollars of one training run."""

    hardware: str
    count: int
    tokens: float
    seq_len: int
    flops_per_token: float
    total_flops: float
    mfu: float | None
    peak_bf16_tflops: float | None
    gpu_hours: float
    days: float
    price_per_hour: float | None
    dollars: float | None
    basis: str
    precision: str = "bf16"  # the peak the MFU is quoted against: bf16, or fp8 (FP8 GEMMs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_train(cfg: Model, tokens: float, gpu: Gpu, count: int, mfu: float | None = None,
                   price: float | None = None, seq_len: int = 4096, precision: str = "bf16") -> TrainEstimate:
    """Time and cost of training ``cfg`` on ``tokens`` with ``count`` x ``gpu`` at ``mfu``:
    GPU-seconds = tokens x FLOPs/token / (mfu x peak). ``precision`` picks the peak, BF16 or FP8 (the
    GEMMs in FP8, as DeepSeek-V3 trained), and the default MFU: for a mixture of experts
    :data:`CALIBRATED_MFU` or :data:`CALIBRATED_FP8_MFU` (both from DeepSeek-V3), for a dense model
    :data:`CALIBRATED_DENSE_MFU` (Llama 3.1 405B); FP8 is faster by :data:`FP8_TRAINING_SPEEDUP`.
    ``ValueError`` for FP8 on a GPU without it."""
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision {precision!r}: choose bf16 or fp8")
    if precision == "fp8" and not gpu.fp8_tflops:
        raise ValueError(f"{gpu.key} has no FP8 tensor cores (no fp8_tflops in the catalog)")
    fpt = flops_per_token(cfg, seq_len)
    basis = "given MFU"
    if mfu is None and is_moe(cfg):
        basis = "calibrated on DeepSeek-V3's published H800-hours"
        mfu = CALIBRATED_MFU if precision == "bf16" else CALIBRATED_FP8_MFU
    elif mfu is None:
        basis = "dense: calibrated on Llama 3.1 405B's published H100-hours"
        mfu = CALIBRATED_DENSE_MFU * (1 if precision == "bf16" else
                                      FP8_TRAINING_SPEEDUP * gpu.bf16_tflops / gpu.fp8_tflops)
    peak = gpu.bf16_tflops if precision == "bf16" else gpu.fp8_tflops
    gpu_hours = tokens * fpt / (mfu * peak * 1e12) / 3600
    price = gpu.price_per_hour if price is None else price
    return TrainEstimate(gpu.key, count, tokens, seq_len, fpt, tokens * fpt, mfu, gpu.bf16_tflops, gpu_hours,
                         gpu_hours / count / 24, price, gpu_hours * price, basis, precision)


def estimate_train_from_throughput(cfg: Model, tokens: float, tokens_per_s: float, run_devices: int,
                                   count: int, hardware: str, mfu: float | None, price: float | None,
                                   seq_len: int = 4096) -> TrainEstimate:
    """Time and cost at a measured throughput, scaled linearly from ``run_devices`` to ``count``
    devices (per-device throughput held fixed: an optimistic assumption for large scale-ups)."""
    fpt = flops_per_token(cfg, seq_len)
    gpu_hours = tokens / (tokens_per_s / run_devices) / 3600
    return TrainEstimate(hardware, count, tokens, seq_len, fpt, tokens * fpt, mfu, None, gpu_hours,
                         gpu_hours / count / 24, price, None if price is None else gpu_hours * price,
                         "measured throughput of the run")


A2A_BYTES = {"fp8": 1, "bf16": 2}
"""Bytes per hidden element of the expert-parallel exchange (FP8 block scales, 4 bytes per 128
elements, about 3%, are not counted)."""


@dataclass
class ExpertParallelEstimate:
    """All-to-all traffic and time of expert parallelism, against the compute of the same tokens.

    Copies and bytes are per token and MoE layer, summed over dispatch and combine (one direction
    of each link: what a GPU sends, which on average equals what it receives); seconds are per token
    of the whole model (all MoE layers, forward and backward) on one GPU, and per micro-batch of
    ``tokens_per_gpu`` tokens."""

    expert_parallel: int
    gpus_per_node: int
    nodes: int
    node_limit: int | None
    two_hop: bool
    dispatch: str
    combine: str
    moe_layers: int
    cross_node_copies: float
    within_node_copies: float
    cross_node_bytes: float
    within_node_bytes: float
    network_gbs: float | None
    nvlink_gbs_each_way: float | None
    comm_s_per_token: float
    compute_s_per_token: float
    peak_compute_s_per_token: float
    tokens_per_gpu: int
    comm_s_per_step: float
    compute_s_per_step: float
    overlap_ratio: float          # compute / all-to-all time at the estimate's MFU
    peak_overlap_ratio: float     # the same with the compute at the dense peak (MFU 1)
    can_hide: bool                # overlap_ratio >= 1: computation overlapped with it covers it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate_expert_parallel(cfg: ModelConfig, est: TrainEstimate, gpu: Gpu, expert_parallel: int,
                             gpus_per_node: int = 8, node_limit: int | None = None, dispatch: str = "fp8",
                             combine: str = "bf16", two_hop: bool = True,
                             tokens_per_gpu: int | None = None) -> ExpertParallelEstimate:
    """The all-to-all of ``expert_parallel`` = K ranks, ``gpus_per_node`` = G to a node, and whether
    the computation of ``est`` (its MFU and precision) can hide it (DeepSeek-V3 Sec. 3.2.1, DualPipe).

    The model: the K ranks fill n = ceil(K / G) nodes of g = min(K, G) GPUs; each of a token's k
    routed experts sits on a uniformly random rank (experts spread evenly, routing balanced), so it
    is on another rank with probability (K-1)/K and on another node with probability (K-g)/K.

    * ``two_hop=False``, one copy per expert slot sent straight to its rank (a plain all_to_all, as
      :class:`gasungbi.train.expert_parallel.EPExperts` sends): k(K-g)/K copies cross nodes and
      k(g-1)/K stay within the node.
    * ``two_hop=True`` (DeepSeek-V3's dispatch kernels, Sec. 3.2.1): a token crosses the network
      once per remote node it targets, to the GPU with its own in-node index, which forwards it over
      NVLink to the target GPUs there. Nodes targeted: the expected number of distinct nodes among k
      uniform draws, n(1 - (1 - 1/n)^k), capped at ``node_limit`` = M (node-limited routing: at most
      M nodes per token; DeepSeek-V3 M = 4); a targeted node is remote with probability (n-1)/n, so
      min(M, n(1-(1-1/n)^k)) (n-1)/n copies cross nodes; a slot needs an NVLink hop unless its
      expert sits on the GPU the token lands on, k(g-1)/g copies. Two slots on the same GPU count
      twice (no per-GPU deduplication).

    Each copy is ``hidden_size`` elements, dispatched in ``dispatch`` and combined in ``combine``
    precision (DeepSeek: FP8 dispatch, BF16 combine); the backward repeats the exchange (the
    gradients travel the reverse way), so a token's all-to-all per MoE layer is twice that. Its time
    is the slower of the network (``network_gbs`` per GPU, each way) and NVLink (``nvlink_gbs`` / 2
    each way), which run at once; MTP modules count as MoE layers. The compute of the same tokens is
    the estimate's GPU-seconds per token (FLOPs / (MFU x peak)); ``peak_overlap_ratio`` puts it at the
    dense peak instead. ``ValueError`` when a needed interconnect figure is missing.
    """
    if not isinstance(cfg, ModelConfig) or not cfg.n_routed_experts:
        raise ValueError("expert parallelism needs an MoE architecture (--model with routed experts)")
    K, G = expert_parallel, gpus_per_node
    if K < 1 or G < 1:
        raise ValueError(f"expert parallel size and GPUs per node must be at least 1, got {K} and {G}")
    if cfg.n_routed_experts % K:
        raise ValueError(f"{cfg.n_routed_experts} routed experts cannot be split over expert-parallel size {K}")
    if K > G and K % G:
        raise ValueError(f"expert-parallel size {K} over nodes of {G} GPUs: use a multiple of {G}")
    for name in (dispatch, combine):
        if name not in A2A_BYTES:
            raise ValueError(f"all-to-all precision {name!r}: choose {' or '.join(A2A_BYTES)}")
    k, d = cfg.num_experts_per_tok, cfg.hidden_size
    n, g = math.ceil(K / G), min(K, G)
    if two_hop:
        targeted = n * (1 - (1 - 1 / n) ** k)
        cross = (targeted if node_limit is None else min(node_limit, targeted)) * (n - 1) / n
        within = k * (g - 1) / g
    else:
        cross, within = k * (K - g) / K, k * (g - 1) / K
    per_copy = d * (A2A_BYTES[dispatch] + A2A_BYTES[combine])
    cross_bytes, within_bytes = cross * per_copy, within * per_copy
    if cross_bytes and not gpu.network_gbs:
        raise ValueError(f"{gpu.key} has no network_gbs in the catalog (the scale-out network per GPU); "
                         "add it with --catalog FILE")
    if within_bytes and not gpu.nvlink_gbs:
        raise ValueError(f"{gpu.key} has no nvlink_gbs in the catalog (GPU-to-GPU within a node); "
                         "add it with --catalog FILE")
    nvlink = gpu.nvlink_gbs / 2 if gpu.nvlink_gbs else None
    layer_s = max(cross_bytes / (gpu.network_gbs * 1e9) if cross_bytes else 0.0,
                  within_bytes / (nvlink * 1e9) if within_bytes else 0.0)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    comm = 2 * moe_layers * layer_s  # forward and backward
    compute = est.gpu_hours * 3600 / est.tokens
    peak = gpu.fp8_tflops if est.precision == "fp8" else gpu.bf16_tflops
    peak_compute = est.flops_per_token / (peak * 1e12)
    tokens_per_gpu = est.seq_len if tokens_per_gpu is None else tokens_per_gpu
    ratio = compute / comm if comm else math.inf
    return ExpertParallelEstimate(K, G, n, node_limit, two_hop, dispatch, combine, moe_layers, cross, within,
                                  cross_bytes, within_bytes, gpu.network_gbs, nvlink, comm, compute, peak_compute,
                                  tokens_per_gpu, comm * tokens_per_gpu, compute * tokens_per_gpu, ratio,
                                  peak_compute / comm if comm else math.inf, ratio >= 1)


def node_limit_of(cfg: ModelConfig, expert_parallel: int, gpus_per_node: int = 8) -> int | None:
    """Node-limited routing implied by the config's group-limited routing: DeepSeek-V3 puts each of
    its ``n_group`` = 8 expert groups on one node, so choosing ``topk_group`` = 4 groups caps a
    token at 4 nodes. When whole groups fill whole nodes (n_group a multiple of the nodes n, or n a
    multiple of n_group), a token reaches at most topk_group x max(1, n / n_group) nodes; otherwise
    ``None`` (no cap)."""
    n = math.ceil(expert_parallel / gpus_per_node)
    if cfg.n_group <= 1 or n <= 1 or (cfg.n_group % n and n % cfg.n_group):
        return None
    return min(n, cfg.topk_group * max(1, n // cfg.n_group))


@dataclass
class RunReport:
    """What one of our training runs measured (``DIR/report.json``, written by the trainer)."""

    tokens_per_s: float
    mfu: float
    device: str
    device_count: int
    model: Any  # a preset name, a checkpoint path or a Hugging Face config dict
    path: str
    name: str = "run model"  # the preset name when the report gives one


def read_run(run_dir: str | Path) -> RunReport:
    """Read ``report.json`` from a run directory, else the last line of ``metrics.jsonl`` that has
    ``tokens_per_s`` and ``mfu``. ``ValueError`` naming the file and the missing key otherwise."""
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"--from-run {d}: no such run directory")
    data: dict[str, Any] | None = None
    path = d / "report.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    elif (d / "metrics.jsonl").exists():
        path = d / "metrics.jsonl"
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "tokens_per_s" in row and "mfu" in row:
                data = {**(data or {}), **row}
    if data is None:
        raise ValueError(f"{d} has no report.json (nor a metrics.jsonl line with tokens_per_s and mfu)")
    for key, kind in (("tokens_per_s", (int, float)), ("mfu", (int, float)), ("device", str), ("device_count", int)):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise ValueError(f"{path}: {key} has the wrong type: {data[key]!r}")
    if data["tokens_per_s"] <= 0 or data["device_count"] < 1:
        raise ValueError(f"{path}: tokens_per_s must be > 0 and device_count >= 1")
    name = next((v for v in (data.get("preset"), data.get("model")) if isinstance(v, str)), "run model")
    return RunReport(float(data["tokens_per_s"]), float(data["mfu"]), data["device"], data["device_count"],
                     data.get("model"), str(path), name)


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

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

    def placement(self) -> dict[str, str]:
        """Part -> "gpu" or "ddr". Hybrid (KTransformers' split): routed experts and the embedding
        table (a lookup reads one row) in DRAM; attention, dense and shared FFNs, router, norms,
        output head and the KV cache on the GPU."""
        parts = ("embedding", "attention", "norms", "dense_ffn", "shared_experts", "router",
                 "routed_experts", "output_head", "kv_cache")
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
    kv = batch * context * kv_bytes_per_token(cfg)
    stored["kv_cache"] = read["kv_cache"] = kv
    # FLOPs: 2 per activated weight per token, and the attention over the context (read from the cache)
    flops = {part: batch * 2 * (n * pc.routed_fraction if part == "routed_experts" else n)
             for part, n in comps.items() if part != "embedding"}
    flops["kv_cache"] = batch * attention_flops_per_token(cfg, context)
    prefill = 2 * (pc.activated - comps["embedding"]) + attention_flops_per_token(cfg, context)
    return stored, read, flops, prefill


def estimate_serve(cfg: Model, setup: Setup, quant: str, context: int = 4096, batch: int = 1) -> ServeEstimate:
    """Where each part lives, whether it fits, and the decode/prefill ceilings (see module doc).

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
    memory_time = sum(read[mem] / bandwidth[mem] for mem in bandwidth)
    compute_time = sum(work[mem] / peak[mem] for mem in bandwidth if peak.get(mem))
    decode = batch / max(memory_time, compute_time)

    prefill = None
    if isinstance(cfg, CountModel):
        mem = place["weights"]
        prefill = peak[mem] / prefill_flops if peak.get(mem) else None
    else:
        pc = count_params(cfg)
        routed_act = pc.components.get("routed_experts", 0) * pc.routed_fraction
        pwork = {"gpu": 0.0, "ddr": 0.0}
        pwork[place["routed_experts"]] += 2 * routed_act
        pwork[place["attention"]] += prefill_flops - 2 * routed_act
        if all(peak.get(mem) for mem, w in pwork.items() if w):
            prefill = 1 / sum(w / peak[mem] for mem, w in pwork.items() if w)

    cost = 0.0
    if setup.gpu:
        cost += setup.gpu_count * setup.gpu.price_per_hour
    if setup.memory:
        owned = setup.memory.platform_price + setup.memory_gb * setup.memory.price_per_gb
        cost += setup.memory_count * owned / AMORTIZE_HOURS
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


# ---------------------------------------------------------------------------------------------
# This machine
# ---------------------------------------------------------------------------------------------

def local_decode(cfg: ModelConfig, bandwidth: float, flops: float, quant: str, context: int = 512) -> dict[str, float]:
    """Decode ceilings of our engine on a machine with ``bandwidth`` bytes/s and ``flops`` FLOP/s
    (measured): memory-bound (bytes read per token, KV in fp32) and compute-bound (2 x activated
    non-embedding parameters + attention forward per token); the prediction is the lower."""
    bits = quant_bits(quant)
    pc = count_params(cfg)
    emb = pc.components["embedding"]
    bytes_per_token = (pc.activated - emb) * bits / 8 + cfg.hidden_size * bits / 8 \
        + context * kv_bytes_per_token(cfg, elem_bytes=4)
    flops_per_token = 2 * (pc.activated - emb) + attention_flops_per_token(cfg, context)
    mem_tps, compute_tps = bandwidth / bytes_per_token, flops / flops_per_token
    return {"quant": quant, "bits_per_weight": bits, "bytes_per_token": bytes_per_token,
            "flops_per_token": flops_per_token, "memory_bound_tokens_per_s": mem_tps,
            "compute_bound_tokens_per_s": compute_tps, "predicted_tokens_per_s": min(mem_tps, compute_tps)}

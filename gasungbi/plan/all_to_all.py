"""Whether computation can hide expert parallelism's all-to-all (DeepSeek-V3 Sec. 3.2.1, DualPipe).

Hidden-vector copies per token and MoE layer across nodes and within one, from uniform expert
placement (stated in :func:`estimate_expert_parallel`), at the catalog's per-GPU network and NVLink
figures, against the GPU-seconds of the same tokens in a :class:`~gasungbi.plan.training.TrainEstimate`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from gasungbi.config import ModelConfig
from gasungbi.plan.catalog import Gpu
from gasungbi.plan.training import TrainEstimate

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

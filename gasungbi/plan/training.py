"""What a training run costs: GPU-hours, wall-clock days and dollars, and the MFU they rest on.

GPU-seconds = tokens x training FLOPs per token (:func:`gasungbi.plan.counts.flops_per_token`) /
(MFU x dense peak). The MFU is relative to the dense peak of the precision the GEMMs ran in (BF16,
or FP8 with ``precision="fp8"``); a BF16 run and an FP8 run of the same model differ by
:data:`FP8_TRAINING_SPEEDUP`, not by the 2x of the peaks. Without a given MFU, the defaults are
calibrated on published runs: DeepSeek-V3 for a mixture of experts, Llama 3.1 405B for a dense model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from gasungbi.plan.catalog import Gpu
from gasungbi.plan.counts import Model, flops_per_token, is_moe

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
with FP8 GEMMs, over :data:`FP8_TRAINING_SPEEDUP` (0.455 / 1.43). ``gasungbi plan backtest``
predicts DeepSeek-V2, an MoE trained in BF16 on H800s, with it."""

CALIBRATED_DENSE_MFU = 0.382
"""Default MFU of a dense BF16 run (no routed experts), against the BF16 peak: what Llama 3.1 405B's
30.84M H100-hours imply under our FLOP count (15.6T tokens, the long-context stages included:
``published.json``), inside the 38-43% the Llama 3 paper reports for that run (arXiv:2407.21783,
Table 4). ``gasungbi plan backtest`` recomputes it as its ``train_dense`` constant and predicts the
other dense runs with it; ``tests/test_plan.py`` checks the two agree.
The MoE default (:data:`CALIBRATED_MFU`) is lower: routed experts are smaller matmuls, with all-to-all."""


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

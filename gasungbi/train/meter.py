"""The cost meter: tokens/s, MFU, device-hours and dollars, live during training.

MFU (PaLM, Chowdhery et al. 2022, Appendix B) = achieved model FLOP/s / peak FLOP/s, where
model FLOPs per token = 6 x activated non-embedding parameters + attention
(``gasungbi.model.accounting.training_flops_per_token``). Peak: on CPU measured once by a matmul
micro-benchmark in the training dtype; on CUDA the dense BF16 figure of the hardware catalog
(``gasungbi.plan``), falling back to a measurement for unknown GPUs.

Price: ``price_per_hour`` per device. The CPU default (0.05 $/h) is about what a 2-vCPU cloud
instance rents for; on CUDA the catalog's typical rental price is used when known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

CPU_PRICE_PER_HOUR = 0.05


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float | None, str]:
    """(peak FLOP/s, typical $/hour or None, device name) of one device; ``float8_e4m3fn`` asks for
    the catalog's dense FP8 peak (FP8 training)."""
    from gasungbi.plan.measure import measure_matmul_flops

    if device.type == "cuda":
        from gasungbi.plan.catalog import load_catalog

        name = torch.cuda.get_device_name(device)
        gpu = load_catalog().match_device(name)
        if gpu is not None:
            fp8 = dtype == torch.float8_e4m3fn and gpu.fp8_tflops
            return (gpu.fp8_tflops if fp8 else gpu.bf16_tflops) * 1e12, gpu.price_per_hour, name
        if dtype == torch.float8_e4m3fn:
            dtype = torch.bfloat16  # measured as BF16: a GPU missing from the catalog has no FP8 figure
        return _measure_cuda_flops(device, dtype), None, name
    import platform
    name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return measure_matmul_flops(dtype=dtype), CPU_PRICE_PER_HOUR, name


def _measure_cuda_flops(device: torch.device, dtype: torch.dtype, size: int = 8192, reps: int = 10) -> float:
    """Dense matmul FLOP/s of a GPU missing from the catalog."""
    import time

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - t)


@dataclass
class CostMeter:
    """Accumulates tokens and wall time; reports throughput, MFU and money."""

    flops_per_token: float
    peak_flops: float  # per device
    price_per_hour: float  # per device
    n_devices: int = 1
    elapsed_before: float = 0.0  # seconds spent by earlier runs of a resumed job
    tokens_before: int = 0
    _start: float = field(default_factory=time.perf_counter)
    _tokens: int = 0
    _window: list = field(default_factory=list)

    def update(self, tokens: int) -> None:
        """Count ``tokens`` processed (all devices together) since the last call."""
        self._tokens += tokens
        self._window.append((time.perf_counter(), self._tokens))
        self._window = self._window[-20:]

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self._start

    @property
    def tokens(self) -> int:
        return self.tokens_before + self._tokens

    @property
    def tokens_per_s(self) -> float:
        """Recent throughput (last 20 updates), or the run average early on."""
        if len(self._window) >= 2:
            (t0, n0), (t1, n1) = self._window[0], self._window[-1]
            if t1 > t0:
                return (n1 - n0) / (t1 - t0)
        run = time.perf_counter() - self._start
        return self._tokens / run if run > 0 else 0.0

    @property
    def average_tokens_per_s(self) -> float:
        run = time.perf_counter() - self._start
        return self._tokens / run if run > 0 else 0.0

    @property
    def mfu(self) -> float:
        return self.tokens_per_s * self.flops_per_token / (self.peak_flops * self.n_devices)

    @property
    def device_hours(self) -> float:
        return self.elapsed * self.n_devices / 3600

    @property
    def dollars(self) -> float:
        return self.device_hours * self.price_per_hour

    def summary(self) -> dict[str, float]:
        return {"tokens": self.tokens, "elapsed_s": round(self.elapsed, 2),
                "tokens_per_s": round(self.average_tokens_per_s, 1),
                "mfu": round(self.average_tokens_per_s * self.flops_per_token / (self.peak_flops * self.n_devices), 5),
                "flops_per_token": self.flops_per_token, "peak_flops_per_device": self.peak_flops,
                "device_hours": round(self.device_hours, 5), "dollars": round(self.dollars, 5),
                "price_per_device_hour": self.price_per_hour, "devices": self.n_devices}

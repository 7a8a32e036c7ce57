"""Quick measurements of the machine it runs on: memory bandwidth and matmul FLOP/s (each well
under 5 s).

``measure_matmul_flops`` is also what the trainer uses as the peak for MFU on a CPU.
"""

from __future__ import annotations

import time

import torch


def measure_memory_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a STREAM-style copy (McCalpin's STREAM "Copy": ``b[:] = a``, counted as
    2 x size bytes moved: one read, one write) of a ``size_mb`` MB float32 tensor, best of
    ``repeats``. Arrays far larger than the caches make it a DRAM figure."""
    n = size_mb * 2**20 // 4
    a = torch.ones(n, dtype=torch.float32)
    b = torch.empty_like(a)
    b.copy_(a)  # touch the pages once
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of ``torch.matmul`` on two ``size`` x ``size`` matrices (2 x size^3 FLOPs each), the
    best rate over short timed batches within about ``seconds``, after one warm-up."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    flop = 2 * size**3
    best, start = 0.0, time.perf_counter()
    while True:
        t0 = time.perf_counter()
        reps = 0
        while reps < 2 or time.perf_counter() - t0 < seconds / 10:
            torch.matmul(a, b)
            reps += 1
        best = max(best, reps * flop / (time.perf_counter() - t0))
        if time.perf_counter() - start >= seconds:
            return best

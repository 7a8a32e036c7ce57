"""Whether a model fits before it is loaded: the bytes it will hold against the memory available.

Needed, per device: the weights at the asked precision as :func:`gasungbi.infer.placement.plan_placement`
counts them from config.json (quantized matrices with their scales; embedding, norms, router and
``kv_b_proj`` in the float dtype), plus the KV cache of one sequence of :data:`KV_TOKENS` tokens
(or the model's context, if shorter). Available: on the CPU the lower of the kernel's
``MemAvailable`` and what the process's cgroup still allows (its ``memory.max`` less its usage, page
cache that can be dropped not counted as used); on CUDA, the free memory ``mem_get_info`` reports.

When a device's need exceeds what it has, :func:`check_fits` raises :class:`DoesNotFit` whose
one-line message names both figures and the precision that would fit, before anything is read:
an out-of-memory kill halfway through loading tells the user nothing. The environment variable
:data:`AVAILABLE_ENV` replaces the measured figure (bytes, every device): for tests, and to load
anyway where the measure is wrong (a larger figure).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import torch

from gasungbi.config import ModelConfig
from gasungbi.infer.placement import Placement, format_bytes, plan_placement

KV_TOKENS = 4096
"""Tokens of KV cache counted in the need (one sequence)."""
AVAILABLE_ENV = "GASUNGBI_MEMORY_AVAILABLE_BYTES"
_PRECISIONS = (None, "int8", "int4")  # widest first


class DoesNotFit(ValueError):
    """The model needs more memory at the asked precision than a device has."""


def _meminfo_available(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """What the process's cgroup (v2, else v1) still allows: limit - usage + inactive page cache;
    None without a limit."""
    try:
        rel = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if line.startswith("0::")), "/")
    except OSError:
        rel = "/"
    candidates = [(Path("/sys/fs/cgroup") / rel.lstrip("/"), "memory.max", "memory.current"),
                  (Path("/sys/fs/cgroup"), "memory.max", "memory.current"),
                  (Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for d, limit_f, usage_f in candidates:
        try:
            limit = (d / limit_f).read_text().strip()
            usage = int((d / usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2**60:
            return None
        inactive = 0
        try:
            for line in (d / "memory.stat").read_text().splitlines():
                if line.startswith(("inactive_file ", "total_inactive_file ")):
                    inactive = int(line.split()[1])
                    break
        except (OSError, ValueError):
            pass
        return max(int(limit) - usage + inactive, 0)
    return None


def available_bytes(device: str | torch.device) -> tuple[int | None, str]:
    """(bytes free for the model on ``device``, where the figure comes from); None when unknown."""
    if os.environ.get(AVAILABLE_ENV):
        return int(os.environ[AVAILABLE_ENV]), AVAILABLE_ENV
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "CUDA mem_get_info"
    if device.type != "cpu":
        return None, "unknown"
    figures = {"MemAvailable": _meminfo_available(), "cgroup limit": _cgroup_available()}
    figures = {k: v for k, v in figures.items() if v is not None}
    if not figures:
        return None, "unknown"
    source = min(figures, key=figures.get)
    return figures[source], source


def needed_bytes(placement: Placement, context: int) -> dict[str, int]:
    """Bytes per device: its weights, and on the main device the KV cache of ``context`` tokens."""
    need = dict(placement.bytes_per_device)
    dev = str(placement.device)
    need[dev] = need.get(dev, 0) + int(placement.kv_bytes_per_token * context)
    return need


def check_fits(cfg: ModelConfig, placement: Placement, dtype: torch.dtype, quant: str | None,
               group_size: int = 128) -> None:
    """:class:`DoesNotFit` when a device of ``placement`` has less memory available than the model
    needs there (see the module docstring); its message names the precision that would fit."""
    context = min(KV_TOKENS, cfg.max_position_embeddings)
    for dev, need in needed_bytes(placement, context).items():
        have, source = available_bytes(dev)
        if have is None or need <= have:
            continue
        asked = quant or str(dtype).removeprefix("torch.")
        hint = "no precision fits (int4 needs more)"
        for q in _PRECISIONS[_PRECISIONS.index(quant) + 1:]:
            other = plan_placement(cfg, placement.device, placement.experts_device, dtype, q, group_size)
            if needed_bytes(other, context).get(dev, 0) <= have:
                hint = f"--quant {q} would fit ({_figure(needed_bytes(other, context)[dev])})"
                break
        raise DoesNotFit(f"the model needs {_figure(need)} on {dev} at {asked} (weights + KV cache for {context:,} "
                         f"tokens) but {_figure(have)} is available ({source}): {hint}")


def _figure(n: int) -> str:
    return f"{n:,} bytes ({format_bytes(n)})"



def large_allocations_from_the_system() -> None:
    """Have glibc's ``malloc`` serve every allocation of 1 MiB or more straight from the system
    (``mallopt(M_MMAP_THRESHOLD)``; elsewhere nothing), so that freeing one returns it at once.

    Reading and quantizing a checkpoint tensor by tensor frees float temporaries of a few MB
    between the quantized tensors it keeps. glibc's default serves such sizes from its heap once
    it has seen a few freed, and the heap's holes between kept tensors still count as resident: a
    quantizing load would end about 1.3x above its quantized weights instead of at them. The
    setting holds for the process; decoding's allocations are mostly smaller than the threshold."""
    global _THRESHOLD_SET
    if _THRESHOLD_SET:
        return
    _THRESHOLD_SET = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(_M_MMAP_THRESHOLD, 2**20)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_THRESHOLD_SET = False

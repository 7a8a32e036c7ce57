"""DeepSeek's FP8 checkpoint format, as released for DeepSeek-V3/R1.

config.json carries ``quantization_config`` = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [128, 128], "activation_scheme": "dynamic"}; every projection weight
(attention projections, dense MLPs, shared and routed experts) is stored as ``float8_e4m3fn``
with a float32 ``<name>_scale_inv`` of shape (ceil(rows/128), ceil(cols/128)), one per 128x128
block (DeepSeek-V3 README_WEIGHTS.md; ``inference/kernel.py``):
    s = max|block| / 448  (the block zero-padded to 128x128),   q = E4M3(w / s),   w ~ q * s
``_scale_inv`` is s itself: the factor that dequantizes. Embedding, output head, router, norms,
the routing bias and MTP's ``eh_proj`` (with its copies of embedding and head) stay in BF16.

Reading dequantizes one tensor at a time into the run dtype while the files are open, so the
whole model never exists in FP32 (or twice) in memory; writing quantizes one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from gasungbi.config import CheckpointError

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                       "activation_scheme": "dynamic"}
BLOCK = 128
E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
# the weights DeepSeek stores in FP8: projections of attention and of every FFN (never mlp.gate)
_FP8_WEIGHT = re.compile(r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|k_proj|v_proj"
                         r"|gate_proj|up_proj|down_proj)\.weight$")


def fp8_config(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a DeepSeek FP8 checkpoint directory, else None.
    ``CheckpointError`` for an FP8 config in another format (fmt, block size)."""
    try:
        d = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    q = d.get("quantization_config") if isinstance(d, dict) else None
    if not (isinstance(q, dict) and q.get("quant_method") == "fp8"):
        return None
    if q.get("fmt", "e4m3") != "e4m3" or list(q.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise CheckpointError(f"{path}: FP8 quantization_config {q} is not DeepSeek's (e4m3, 128x128 blocks)")
    return q


def is_fp8_weight(name: str, t: torch.Tensor) -> bool:
    """Whether DeepSeek's format stores this (HF-named) tensor in FP8."""
    return t.dim() == 2 and bool(_FP8_WEIGHT.search(name))


def weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (M, N) -> (q float8_e4m3fn (M, N), scale_inv float32 (ceil(M/128), ceil(N/128)))."""
    M, N = w.shape
    mb, nb = -(-M // BLOCK), -(-N // BLOCK)
    blocks = torch.nn.functional.pad(w.float(), (0, nb * BLOCK - N, 0, mb * BLOCK - M)).view(mb, BLOCK, nb, BLOCK)
    s = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (blocks / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(mb * BLOCK, nb * BLOCK)[:M, :N].contiguous(), s


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(128x128 block of q) * its scale_inv, computed in FP32, returned in ``dtype``."""
    M, N = q.shape
    if scale_inv.shape != (-(-M // BLOCK), -(-N // BLOCK)):
        raise CheckpointError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a {M}x{N} weight "
                              f"in 128x128 blocks")
    s = scale_inv.float().repeat_interleave(BLOCK, 0)[:M].repeat_interleave(BLOCK, 1)[:, :N]
    return (q.float() * s).to(dtype)


def read_fp8(files: list[Path], device: str | torch.device, dtype: torch.dtype,
             report=lambda msg: print(msg, file=sys.stderr), convert=None) -> dict[str, torch.Tensor]:
    """All tensors of an FP8 checkpoint's safetensors files in ``dtype``: each FP8 weight is
    dequantized with its ``_scale_inv`` (found in whichever file holds it) as soon as it is read,
    the other tensors are cast; ``report`` gets a line with the count and the peak memory.
    ``convert(name, tensor) -> {name: tensor, ...}``, when given, replaces each tensor as soon as it
    is read (e.g. quantizes it to int8), so that no float copy of the whole model ever exists."""
    out: dict[str, torch.Tensor] = {}
    n = 0
    with contextlib.ExitStack() as stack:
        where = {}
        for f in files:
            try:
                sf = stack.enter_context(safe_open(str(f), framework="pt", device=str(device)))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
            where.update({k: (sf, f) for k in sf.keys()})
        for k, (sf, f) in where.items():
            if k.endswith(SCALE_SUFFIX):
                if k.removesuffix(SCALE_SUFFIX) not in where:
                    raise CheckpointError(f"{f}: {k} has no weight {k.removesuffix(SCALE_SUFFIX)}")
                continue
            t = sf.get_tensor(k)
            if t.dtype == torch.float8_e4m3fn:
                if k + SCALE_SUFFIX not in where:
                    raise CheckpointError(f"{f}: FP8 tensor {k} has no {k}{SCALE_SUFFIX}")
                s_sf, _ = where[k + SCALE_SUFFIX]
                t = weight_dequant(t, s_sf.get_tensor(k + SCALE_SUFFIX), dtype)
                n += 1
            elif t.is_floating_point():
                t = t.to(dtype)
            if convert is None:
                out[k] = t
            else:
                out.update(convert(k, t))
    if report is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        report(f"FP8 checkpoint: {n} block-scaled weights dequantized to {str(dtype).removeprefix('torch.')} "
               f"one at a time{' and converted' if convert else ''}; peak process memory {peak:.2f} GiB")
    return out


def to_fp8_state_dict(hf_tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """HF-named tensors -> DeepSeek's FP8 layout: projection weights as E4M3 + ``_scale_inv``, the rest
    in ``dtype`` (one tensor at a time)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in hf_tensors.items():
        if is_fp8_weight(k, t):
            out[k], out[k + SCALE_SUFFIX] = weight_quant(t)
        else:
            out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def fp8_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one FP8-stored weight: 1 per element + 4 per 128x128 block's scale."""
    rows, cols = shape
    return rows * cols + 4 * -(-rows // BLOCK) * -(-cols // BLOCK)

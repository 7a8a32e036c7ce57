"""Loading a checkpoint for generation: memory report, then load, quantize and place."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from gasungbi.config import read_config
from gasungbi.infer import quant as q
from gasungbi.infer.placement import apply_placement, plan_placement, resolve_device
from gasungbi.interop.fp8 import fp8_config
from gasungbi.interop.hf import load_model


def load_for_inference(path: str | os.PathLike, device: str | torch.device | None = "auto",
                       dtype: torch.dtype | None = None, quant: str | None = None, group_size: int = 128,
                       experts_device: str | torch.device | None = None,
                       report: Callable[[str], None] | None = print) -> nn.Module:
    """Load a checkpoint for generation: report the memory per device first, then load (a
    gasungbi-quantized checkpoint as it is; otherwise quantize on the fly when ``quant`` is given)
    and place. ``dtype`` defaults to bf16 on CUDA and to the checkpoint's on the CPU."""
    device = resolve_device(device)
    qcfg = q.quantization_config(path)
    if qcfg is not None:
        if quant is not None and quant != qcfg["mode"]:
            raise ValueError(f"{path} is already quantized to {qcfg['mode']}; cannot load it as {quant}")
        quant, group_size = qcfg["mode"], qcfg.get("group_size", group_size)
    cfg = read_config(path)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    plan = plan_placement(cfg, device, experts_device, dtype or torch.float32, quant, group_size)
    if report is not None:
        report(plan.format(cfg.max_position_embeddings))
    if qcfg is not None:
        return q.load_quantized(path, device, dtype or torch.float32, plan.experts_device)
    if quant is not None and fp8_config(path) is not None:  # DeepSeek's FP8 straight to int8/int4
        return q.load_fp8_quantized(path, quant, group_size, device, dtype or torch.float32, plan.experts_device)
    model = load_model(path, "cpu", dtype)
    if quant is not None:
        return q.quantize(model, quant, group_size, device, plan.experts_device)
    return apply_placement(model, plan).eval()

"""Loading a checkpoint for generation: memory report, then load, quantize and place.

Three kinds of checkpoint: a floating-point one, a gasungbi-quantized one (:func:`load_quantized`;
the files: :mod:`gasungbi.interop.quantized`), and DeepSeek's FP8 one. With a quantization asked,
a floating-point or FP8 checkpoint goes straight to int8/int4 one tensor at a time
(:func:`load_quantizing`), so the float model is never whole in memory. Before anything is read,
:func:`gasungbi.infer.memory.check_fits` refuses a model that does not fit the memory available.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gasungbi.config import CheckpointError, ModelConfig, read_config
from gasungbi.infer.memory import check_fits, large_allocations_from_the_system
from gasungbi.infer.placement import apply_placement, plan_placement, resolve_device
from gasungbi.infer.quant import check_group_size, check_mode, quantize_weight, quantized_keys
from gasungbi.infer.quant_modules import from_quantized_state_dict
from gasungbi.interop.fp8 import fp8_config, read_fp8
from gasungbi.interop.hf import (_HF_EXPERT, check_sizes, from_hf_state_dict, headers, load_model,
                                 read_safetensors, weight_files)
from gasungbi.interop.quantized import WEIGHTS_FILE, quantization_config, read_quantized
from gasungbi.model.transformer import Transformer, build_model


def load_for_inference(path: str | os.PathLike, device: str | torch.device | None = "auto",
                       dtype: torch.dtype | None = None, quant: str | None = None, group_size: int = 128,
                       experts_device: str | torch.device | None = None,
                       report: Callable[[str], None] | None = print) -> nn.Module:
    """Load a checkpoint for generation: report the memory per device first, then load (a
    gasungbi-quantized checkpoint as it is; otherwise quantize on the fly when ``quant`` is given)
    and place. ``dtype`` defaults to bf16 on CUDA and to the checkpoint's on the CPU."""
    device = resolve_device(device)
    if quant == "int4":
        check_group_size(group_size)
    qcfg = quantization_config(path)
    if qcfg is not None:
        if quant is not None and quant != qcfg["mode"]:
            raise ValueError(f"{path} is already quantized to {qcfg['mode']}; cannot load it as {quant}")
        quant, group_size = qcfg["mode"], qcfg.get("group_size", group_size)
    cfg = read_config(path)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    held = dtype or (torch.float32 if quant is not None else _stored_dtype(Path(path)))
    plan = plan_placement(cfg, device, experts_device, held, quant, group_size)
    check_fits(cfg, plan, held, quant, group_size)  # before anything is read: one line, not an OOM kill
    if report is not None:
        report(plan.format(cfg.max_position_embeddings))
    if qcfg is not None:
        return load_quantized(path, device, dtype or torch.float32, plan.experts_device)
    if quant is not None:  # one tensor at a time: the float model is never whole in memory
        return load_quantizing(path, quant, group_size, device, dtype or torch.float32, plan.experts_device)
    model = load_model(path, "cpu", dtype)
    return apply_placement(model, plan).eval()


def _stored_dtype(path: Path) -> torch.dtype:
    """The float dtype a float checkpoint loads in when none is asked: its tensors' (bf16 for
    DeepSeek's FP8 format, which is dequantized to it)."""
    if fp8_config(path) is not None:
        return torch.bfloat16
    floats = [t.dtype for t in headers(weight_files(path)).values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else torch.float32


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   experts_device: str | torch.device | None = None) -> Transformer:
    """Load a checkpoint written by :func:`gasungbi.interop.quantized.save_quantized`, in the kernel
    layout of ``device``."""
    large_allocations_from_the_system()
    cfg, qsd = read_quantized(path)
    try:
        return from_quantized_state_dict(cfg, qsd, device, dtype, experts_device, consume=True)
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / WEIGHTS_FILE}: {e}") from None


def load_quantizing(path: str | os.PathLike, mode: str, group_size: int = 128, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32,
                       experts_device: str | torch.device | None = None) -> Transformer:
    """A floating-point or DeepSeek FP8 checkpoint (:mod:`gasungbi.interop.fp8`) straight to ``mode``
    (int8/int4), one tensor at a time (:func:`read_quantizing`), built for generation. Equal to
    quantizing the whole float model."""
    path = Path(path)
    cfg, qsd = read_quantizing(path, mode, group_size, dtype)
    try:
        return from_quantized_state_dict(cfg, qsd, device, dtype, experts_device, consume=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_quantizing(path: str | os.PathLike, mode: str, group_size: int = 128,
                    dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the portable quantized state dict (:mod:`gasungbi.infer.quant`, on the CPU) of
    a floating-point or DeepSeek FP8 checkpoint: each weight is read (an FP8 one dequantized to
    float32) and at once quantized, so the largest float tensor alive is one weight matrix, never
    the model, and the resident memory is about the quantized model's. The tensors left in floating
    point are in ``dtype``."""
    check_mode(mode)
    large_allocations_from_the_system()  # temporaries freed between kept tensors leave no holes
    path = Path(path)
    cfg = read_config(path)
    targets = set(quantized_keys(build_model(cfg, device="meta")))
    L = cfg.num_hidden_layers

    def ours(name: str) -> str:  # our name of an HF tensor: MTP renumbered, expert index dropped
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= L:
            name = f"model.mtp.{int(m.group(1)) - L}.{m.group(2)}"
        m = _HF_EXPERT.match(name)
        return f"{m.group(1)}.{m.group(3)}" if m else name

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        quantized = quantize_weight(t, mode, group_size) if ours(name) in targets else None
        if quantized is not None:
            return {name: quantized[0], name + "_scales": quantized[1]}
        return {name: t.to(dtype) if t.is_floating_point() else t}

    files = weight_files(path)
    if fp8_config(path) is not None:
        tensors = read_fp8(files, "cpu", torch.float32, convert=convert)
    else:
        check_sizes(path, cfg, headers(files))
        tensors, experts = {}, {}
        for f in files:
            for k, t in read_safetensors(f):
                for name, q in convert(k, t).items():
                    _collect(tensors, experts, name, q, cfg.n_routed_experts)
        for group in experts.values():  # incomplete: from_hf_state_dict names what is missing
            tensors.update(group)
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in tensors):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # MTP declared but not stored (see load_model)
    values = {k: v for k, v in tensors.items() if not k.endswith("_scales")}
    scales = {k.removesuffix("_scales"): v for k, v in tensors.items() if k.endswith("_scales")}
    qsd = from_hf_state_dict(cfg, values)
    qsd.update({k + "_scales": v for k, v in from_hf_state_dict(cfg, scales).items()})
    return cfg, qsd


def _collect(tensors: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]], name: str,
             t: torch.Tensor, n_experts: int) -> None:
    """Put one read (and quantized) tensor in ``tensors``; a routed expert's waits in ``experts`` until
    its layer's n_experts are read, then they are stacked under the stacked name (which
    from_hf_state_dict passes through): the per-expert pieces are freed layer by layer, not at the end."""
    m = re.match(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scales)?$", name)
    if not m:
        tensors[name] = t
        return
    stacked = f"{m.group(1)}.{m.group(3)}" + ("_scales" if m.group(4) else "")
    group = experts.setdefault(stacked, {})
    group[name] = t
    if len(group) == n_experts:
        del experts[stacked]
        pieces = {int(re.match(r"^.*\.experts\.(\d+)\.", k).group(1)): v for k, v in group.items()}
        if sorted(pieces) == list(range(n_experts)):
            tensors[stacked] = torch.stack([pieces.pop(e) for e in range(n_experts)])
        else:
            tensors.update(group)

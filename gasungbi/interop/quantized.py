"""gasungbi's quantized checkpoint format: weight-only int8/int4, in the Hugging Face layout.

A directory with config.json (the float model's, plus ``quantization_config`` = {"quant_method":
"gasungbi", "mode": "int8" | "int4", "group_size": the requested int4 group size, "format_version":
2}), ``model.safetensors`` and the tokenizer files. The tensors are the *portable* quantized state
dict in gasungbi's names (the float model's state dict, routed experts stacked [E, ...]), with one
naming scheme for every quantized tensor: the values keep the float parameter's name
(``model.layers.0.self_attn.o_proj.weight``, ``model.layers.1.mlp.experts.gate_proj``) and its
scales are ``<that name>_scales``:
  int8  values int8 [..., N, K]; scales fp32 [..., N]       w ~ q * s (per output row)
  int4  values uint8 [..., N, K/2], two 4-bit values per byte, high nibble first;
        scales fp32 [..., K/g, N, 2] (scale, zero per group of g input columns)   w ~ (q - 8) * s + z
The mode follows from the values' dtype and the int4 group size from the scales' shape; every
other tensor is the float model's. Format 1 (``.scales`` / ``.scales_and_zeros`` suffixes, the
mode spelled in the name) is refused: re-run ``gasungbi quantize``. A quantized checkpoint is
gasungbi's own: transformers refuses its ``quant_method``.

This module reads and writes the files only; :mod:`gasungbi.infer.quant` makes the portable state
dict and :func:`gasungbi.infer.load.load_quantized` builds a model from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gasungbi import atomic
from gasungbi.config import CheckpointError, ModelConfig, from_hf_config, to_hf_config
from gasungbi.interop.hf import copy_tokenizer, read_safetensors, write_safetensors

QUANT_METHOD = "gasungbi"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"


def save_quantized(qsd: dict[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike, mode: str,
                   group_size: int, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a portable quantized state dict with its config (and tokenizer files) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = to_hf_config(cfg)
    hf["quantization_config"] = {"quant_method": QUANT_METHOD, "mode": mode, "group_size": group_size,
                                 "format_version": FORMAT_VERSION}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in qsd.items()}  # one tensor at a time, aliases copied
    atomic.write_file(path / WEIGHTS_FILE, lambda tmp: write_safetensors(
        tmp, specs, qsd.__getitem__, metadata={"format": "pt", "quantization": mode}))
    atomic.write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)
    return path


def quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a gasungbi-quantized checkpoint directory, else None;
    ``CheckpointError`` for one written in another format version."""
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or not JSON: read_config names the problem
        return None
    q = d.get("quantization_config") if isinstance(d, dict) else None
    if not (isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD):
        return None
    if q.get("format_version", 1) != FORMAT_VERSION:
        raise CheckpointError(f"{path} is a gasungbi-quantized checkpoint in format {q.get('format_version', 1)}; "
                              f"this version reads format {FORMAT_VERSION}: re-run `gasungbi quantize` on the "
                              f"floating-point checkpoint")
    return q


def read_quantized(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and the portable quantized state dict of a checkpoint written by :func:`save_quantized`;
    ``CheckpointError`` for a directory that is not one. Read one tensor at a time (no file mapped)."""
    path = Path(path)
    if quantization_config(path) is None:
        raise CheckpointError(f"{path} is not a gasungbi-quantized checkpoint (no quantization_config in config.json)")
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    return cfg, dict(read_safetensors(path / WEIGHTS_FILE))

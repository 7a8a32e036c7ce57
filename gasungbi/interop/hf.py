"""Load and save models in the Hugging Face layout: config.json + safetensors (+ tokenizer files).

The state-dict adapter between gasungbi's names and the HF checkpoint names:
  * routed experts: stacked ``mlp.experts.{gate,up,down}_proj`` [E, ...] <->
    per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (the released DeepSeek layout, which
    transformers also writes and reads);
  * MTP modules: ``model.mtp.{k}.*`` <-> ``model.layers.{L+k}.*`` as in DeepSeek-V3's release,
    which also stores copies of the embedding and head there (``embed_tokens``,
    ``shared_head.head``); we write those copies for vLLM/SGLang and ignore them on load;
  * DeepSeek-V4: DeepSeek's release names (``layers.3.attn.wq_a.weight``, ``ffn.experts.7.w1.weight``,
    ``embed.weight``...; :data:`V4_NAMES`) are written, and read besides transformers' own names and
    the mix that transformers' ``save_pretrained`` writes; the release's MTP block (``mtp.*``) is skipped.

Weights are read with safetensors only; pickle checkpoints (``*.bin``, ``*.pt``) are refused.
DeepSeek's FP8 checkpoints (E4M3 weights with 128x128 block scales, :mod:`gasungbi.interop.fp8`)
are read dequantized to the run dtype one tensor at a time, and ``save_model(fp8=True)`` writes them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gasungbi.config import CheckpointError, ModelConfig, from_hf_config, read_config, to_hf_config  # noqa: F401
from gasungbi import atomic
from gasungbi.interop import fp8 as fp8_format
from gasungbi.model.transformer import Transformer, build_model, from_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ---------------------------------------------------------------------------------------------
# name mapping
# ---------------------------------------------------------------------------------------------

V4_TOP = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "model.norm.weight": "norm.weight",
          "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
          "model.hc_head.hc_scale": "hc_head_scale"}
_V4_COMPRESSOR = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight", "kv_norm.weight": "norm.weight",
                  "position_bias": "ape"}
V4_NAMES = {  # a layer's tensors: ours (transformers') -> DeepSeek's release
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{s}_hc.{p}": f"hc_{s}_{p}" for s in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.sinks": "attn.attn_sink",
    **{f"self_attn.{a}.weight": f"attn.{b}.weight" for a, b in (
        ("q_a_proj", "wq_a"), ("q_a_norm", "q_norm"), ("q_b_proj", "wq_b"), ("kv_proj", "wkv"), ("kv_norm", "kv_norm"),
        ("o_a_proj", "wo_a"), ("o_b_proj", "wo_b"))},
    **{f"self_attn.compressor.{a}": f"attn.compressor.{b}" for a, b in _V4_COMPRESSOR.items()},
    **{f"self_attn.compressor.indexer.{a}": f"attn.indexer.compressor.{b}" for a, b in _V4_COMPRESSOR.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    **{f"mlp.shared_experts.{a}.weight": f"ffn.shared_experts.{b}.weight" for a, b in (
        ("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))},
}
_V4_READ = {b: a for a, b in V4_NAMES.items()} | {"attn.norm.weight": "self_attn.kv_norm.weight"}  # + transformers' save
_V4_EXPERT = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _v4_to_release(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DeepSeek-V4 state dict in DeepSeek's release names (routed experts one by one: w1 gate, w2 down, w3 up)."""
    out: dict[str, torch.Tensor] = {}
    inverse = {b: a for a, b in _V4_EXPERT.items()}
    for name, t in sd.items():
        if name in V4_TOP:
            out[V4_TOP[name]] = t
            continue
        i, rest = re.match(r"^model\.layers\.(\d+)\.(.*)$", name).groups()
        m = re.match(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)$", rest)
        if m:
            for e in range(t.shape[0]):
                out[f"layers.{i}.ffn.experts.{e}.{inverse[m.group(1)]}.weight"] = t[e]
        else:
            out[f"layers.{i}.{V4_NAMES[rest]}"] = t
    return out


def _v4_from_disk(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek-V4 tensors under DeepSeek's, transformers' or transformers' ``save_pretrained`` names ->
    ours, routed experts still one by one (as ``model.layers.i.mlp.experts.e.gate_proj.weight``; stacked
    by the caller). The MTP block (``mtp.*``) is dropped; hash tables become int64."""
    top = {b: a for a, b in V4_TOP.items()} | {a.removeprefix("model."): a for a in V4_TOP}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = name.removeprefix("model.")
        if key.startswith("mtp."):
            continue
        m = re.match(r"^layers\.(\d+)\.(.*)$", key)
        if key in top or not m:
            out[top.get(key, name)] = t
            continue
        prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
        e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])\.weight$", rest)
        if e:
            out[f"{prefix}mlp.experts.{e.group(1)}.{_V4_EXPERT[e.group(2)]}.weight"] = t
        elif rest == "mlp.experts.gate_up_proj":  # transformers' fused [E, 2I, d]: gate rows first
            out[prefix + "mlp.experts.gate_proj"], out[prefix + "mlp.experts.up_proj"] = t.chunk(2, dim=1)
        else:
            out[prefix + _V4_READ.get(rest, rest)] = t.long() if rest.endswith("tid2eid") else t
    return out


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict in HF names (experts split, MTP renumbered, tied head dropped; DeepSeek-V4: its
    release's names)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    sd = model.state_dict()
    if cfg.is_v4:
        return _v4_to_release(sd)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        name = re.sub(r"^model\.mtp\.(\d+)\.", lambda m: f"model.layers.{L + int(m.group(1))}.", name)
        m = _EXPERT.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
        else:
            out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = sd["model.embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = sd["lm_head.weight"]
    return out


def from_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF names -> ours. Experts are stacked; MTP copies of embedding/head are dropped."""
    L = cfg.num_hidden_layers
    if cfg.is_v4:
        tensors = _v4_from_disk(cfg, tensors)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue
            name = f"model.mtp.{k}.{rest}"
        m = _HF_EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[name] = t
    for (prefix, proj), per in experts.items():
        n = cfg.n_routed_experts
        if len(per) != n or max(per) != n - 1:  # bounded: a config may claim 10^9 experts
            missing = [e for e in range(min(n, max(per) + 9)) if e not in per][:8]
            raise CheckpointError(f"config.json's n_routed_experts={n}, but {prefix} holds {len(per)} experts "
                                  f"for {proj} (ids {min(per)}..{max(per)}; missing {missing})")
        out[f"{prefix}.{proj}"] = torch.stack([per[e] for e in range(n)])
    if cfg.tie_word_embeddings and "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: those its index names, else
    ``model.safetensors``. An index entry must be a file in the directory itself (as transformers
    writes them): one naming a path elsewhere (``../outside.safetensors``) is a CheckpointError."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        for f in files:
            # by name, not resolved: a file of the folder may be a link (the Hugging Face cache links to its blobs)
            if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
                raise CheckpointError(f"{index} names {f!r}, which is not a file inside {path}")
            if not (path / f).exists():
                raise CheckpointError(f"{index} names {f}, which does not exist in {path}")
        return [path / f for f in files]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise CheckpointError(f"{path} holds only pickle weights ({', '.join(pickles)}); gasungbi loads "
                              "safetensors only and never unpickles untrusted files. Convert them with "
                              "a tool you trust, e.g. transformers' save_pretrained(safe_serialization=True).")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "F8_E4M3": torch.float8_e4m3fn, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the safetensors file ``f`` in file order, read into its own memory with plain
    reads, one at a time: resident memory grows by the tensors the caller keeps, never by the file
    (the pages of a memory-mapped file that were read would count as the process's until unmapped);
    the pages read are dropped from the page cache. ``CheckpointError`` for a file cut short."""
    with open(f, "rb") as fh:
        try:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            entries = sorted(((k, v["dtype"], v["shape"], *v["data_offsets"]) for k, v in header.items()),
                             key=lambda e: e[3])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
        for name, dtype, shape, start, end in entries:
            if dtype not in _ST_DTYPES:
                raise CheckpointError(f"{f}: {name} has dtype {dtype}, which gasungbi does not read")
            buf = bytearray(end - start)
            fh.seek(8 + n + start)
            if fh.readinto(buf) != len(buf):
                raise CheckpointError(f"{f}: cut short inside {name}")
            if hasattr(os, "posix_fadvise") and buf:
                os.posix_fadvise(fh.fileno(), 8 + n + start, len(buf), os.POSIX_FADV_DONTNEED)
            t = torch.frombuffer(buf, dtype=_ST_DTYPES[dtype]) if buf else torch.empty(0, dtype=_ST_DTYPES[dtype])
            yield name, t.reshape(shape)


def write_safetensors(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensor: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file of the tensors ``specs`` names (name -> (dtype, shape)), in that
    order, asking ``tensor(name)`` for each as it is written: one tensor at a time, so a file of
    tensors made on demand (or a state dict, without the copy of every tensor that
    ``safetensors.torch.save_file`` makes) never needs more memory than its largest tensor."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for name, (dtype, shape) in specs.items():
            t = tensor(name).detach().to("cpu").contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            if t.numel():
                fh.write(t.view(-1).view(torch.uint8).numpy().data)


def _warn_non_finite(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """Warn (once per load) when weights hold NaN or Inf: such a model loads but outputs garbage."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{path}: {len(bad)} tensor(s) hold NaN or Inf values: {', '.join(bad[:5])}"
                      f"{' ...' if len(bad) > 5 else ''}; the model's outputs will not be meaningful",
                      RuntimeWarning, stacklevel=3)


def headers(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` as an empty meta tensor of its shape and dtype (the
    headers only: no data is read)."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    dtype = _ST_DTYPES.get(sl.get_dtype(), torch.float32)
                    out[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    return out


def _without_absent_mtp(cfg: ModelConfig, tensors: dict) -> ModelConfig:
    """A config that declares MTP modules whose weights are not stored (transformers saves none)."""
    L = cfg.num_hidden_layers
    if cfg.is_v4:  # its MTP block is never built; the field stays for config.json
        return cfg
    if cfg.num_nextn_predict_layers and not any(re.match(rf"^model\.layers\.{L}\.", k) for k in tensors):
        return cfg.replace(num_nextn_predict_layers=0)
    return cfg


def check_sizes(path: Path, cfg: ModelConfig, headers: dict[str, torch.Tensor]) -> ModelConfig:
    """``cfg`` checked against the checkpoint's tensor shapes before anything is built or read: a
    config.json whose sizes the weights do not hold (10^9 experts, 10^6 layers) is refused naming the
    field, instead of growing a model the machine cannot hold."""
    if cfg.is_v4:
        headers = _v4_from_disk(cfg, headers)
    layers = {int(m.group(1)) for k in headers if (m := re.match(r"^model\.layers\.(\d+)\.", k))}
    depth = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if layers and cfg.num_hidden_layers > max(layers) + 1:
        raise CheckpointError(f"{path}: config.json's num_hidden_layers={cfg.num_hidden_layers}, but the weights "
                              f"hold layers 0..{max(layers)}")
    if layers and max(layers) >= depth:
        raise CheckpointError(f"{path}: the weights hold layer {max(layers)}, beyond config.json's "
                              f"num_hidden_layers={cfg.num_hidden_layers} + num_nextn_predict_layers="
                              f"{cfg.num_nextn_predict_layers}")
    cfg = _without_absent_mtp(cfg, headers)
    for field, (value, name, shape) in _sizes_on_disk(cfg, headers).items():
        if getattr(cfg, field) != value:
            raise CheckpointError(f"{path}: config.json's {field}={getattr(cfg, field)!r}, but the weights have "
                                  f"{value} ({name} is {tuple(shape)})")
    _match(path, cfg, from_hf_state_dict(cfg, headers))  # (V4 names, already ours, pass unchanged)
    return cfg


def _sizes_on_disk(cfg: ModelConfig, headers: dict[str, torch.Tensor]) -> dict[str, tuple[int, str, tuple]]:
    """The sizes config.json gives that the tensors' shapes show directly: field -> (value, tensor, shape)."""
    probes = {  # field -> (tensor, dim)
        "vocab_size": ("model.embed_tokens.weight", 0), "hidden_size": ("model.embed_tokens.weight", 1),
        "kv_lora_rank": ("model.layers.0.self_attn.kv_a_layernorm.weight", 0),
        "q_lora_rank": ("model.layers.0.self_attn.q_a_layernorm.weight", 0),
        "moe_intermediate_size": (f"model.layers.{cfg.first_k_dense_replace}.mlp.experts.0.gate_proj.weight", 0),
        "index_head_dim": ("model.layers.0.self_attn.indexer.wk.weight", 0),
        "index_n_heads": ("model.layers.0.self_attn.indexer.weights_proj.weight", 0),
    }
    if cfg.is_v4:
        probes.update(head_dim=("model.layers.0.self_attn.kv_norm.weight", 0),
                      q_lora_rank=("model.layers.0.self_attn.q_a_norm.weight", 0))
    if not cfg.is_mla or cfg.first_k_dense_replace > 0:
        probes["intermediate_size"] = ("model.layers.0.mlp.gate_proj.weight", 0)
    if cfg.n_routed_experts:
        probes["n_routed_experts"] = (f"model.layers.{cfg.first_k_dense_replace}.mlp.gate.weight", 0)
    if not cfg.is_mla:
        probes["num_key_value_heads"] = ("model.layers.0.self_attn.k_proj.weight", 0)
    out = {}
    for field, (name, dim) in probes.items():
        t = headers.get(name)
        if t is not None and t.dim() > dim and getattr(cfg, field) is not None:
            value = t.shape[dim]
            if field == "num_key_value_heads":  # rows = heads x head_dim
                if value % cfg.gqa_head_dim:
                    continue
                value //= cfg.gqa_head_dim
                if cfg.num_key_value_heads is None:
                    continue
            out[field] = (value, name, tuple(t.shape))
    return out


def _match(path: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> None:
    """Every tensor the model of ``cfg`` has, of its shape, and no other (CheckpointError naming them)."""
    expected = build_model(cfg, device="meta").state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if bad_shape:
            parts.append(f"misshapen tensors ({len(bad_shape)}): {'; '.join(bad_shape[:10])}")
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: " + " | ".join(parts))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Load a Hugging Face-layout directory (ours, or transformers' DeepseekV3/V32/V2, Qwen2/Qwen3,
    Llama) as a :class:`Transformer`. ``dtype`` defaults to the checkpoint's. Its config.json's sizes
    are checked against the tensors' shapes in the safetensors headers before any data is read.

    MTP weights are optional: a checkpoint whose config declares MTP modules but stores none
    (transformers does not save them) loads with ``num_nextn_predict_layers = 0``. A DeepSeek FP8
    checkpoint is dequantized one tensor at a time to ``dtype`` (default bf16).
    """
    path = Path(path)
    cfg = read_config(path)
    fp8 = fp8_format.fp8_config(path) is not None
    files = weight_files(path)
    if not fp8:  # every size in config.json against the tensors on disk, before any is read
        cfg = check_sizes(path, cfg, headers(files))
    if fp8:  # DeepSeek's FP8 format: dequantized while read
        dtype = dtype or torch.bfloat16
        tensors = fp8_format.read_fp8(files, device, dtype)
    else:
        tensors = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt", device=str(device)) as sf:
                    for k in sf.keys():
                        tensors[k] = sf.get_tensor(k)
            except Exception as e:  # a file cut short, or changed since its header was read
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from None
    cfg = _without_absent_mtp(cfg, tensors)
    sd = from_hf_state_dict(cfg, tensors)
    _match(path, cfg, sd)
    _warn_non_finite(path, sd)
    if dtype is not None:  # (V4's token -> experts tables stay integers)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return from_state_dict(cfg, sd).eval()


def save_model(model: Transformer, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
               max_shard_bytes: int = 5 * 2**30, fp8: bool = False) -> Path:
    """Write ``model`` as a Hugging Face directory that transformers loads unchanged.

    Files are written to temporary names and renamed, so a crash never leaves a half-written
    ``model.safetensors``. Above ``max_shard_bytes`` the weights are sharded with an index.
    ``tokenizer``: a directory (or tokenizer.json) whose tokenizer files are copied alongside.
    ``fp8``: DeepSeek's FP8 format (projection weights E4M3 with ``_scale_inv`` per 128x128 block,
    the rest bf16, ``quantization_config`` in config.json).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_hf_state_dict(model).items()}
    if fp8:
        tensors = fp8_format.to_fp8_state_dict(tensors)
    # safetensors refuses aliased storage: give every tensor its own
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen or v.numel() != v.untyped_storage().nbytes() // v.element_size():
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    dtype = next(iter(tensors.values())).dtype
    hf = to_hf_config(cfg)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        hf["quantization_config"] = dict(fp8_format.QUANTIZATION_CONFIG)
    atomic.write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    atomic.write_text(path / "generation_config.json", json.dumps(gen, indent=2) + "\n")
    shards = _split(tensors, max_shard_bytes)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        _atomic_save(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, path / name)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        atomic.write_text(path / "model.safetensors.index.json",
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)
    return path


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy tokenizer files from a directory (or a tokenizer.json path) into ``dst``."""
    src, dst = Path(src), Path(dst)
    files: Iterable[Path] = [src] if src.is_file() else [src / f for f in TOKENIZER_FILES if (src / f).exists()]
    for f in files:
        if f.resolve() != (dst / f.name).resolve():
            shutil.copyfile(f, dst / f.name)


def _split(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], dest: Path) -> None:
    atomic.write_file(dest, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

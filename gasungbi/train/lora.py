"""LoRA and QLoRA: low-rank adapters trained on a frozen base, applied as a pass on a finished model.

LoRA (Hu et al. 2021, Sec. 4.1): a frozen weight W0 [out, in] of a target projection gets a
trainable low-rank update,
    h = W0 x + (alpha / r) B A x,       A [r, in], B [out, r]
A starts as ``nn.Linear``'s default (Kaiming-uniform, a = sqrt(5)) and B as zeros, so a run starts
from the base model exactly (PEFT's initialization). Only A and B train; every base parameter is
frozen, so the optimizer holds the adapters alone, and a checkpoint holds the adapters, the
optimizer and the run's state (the base is rebuilt from ``init_from`` on resume).

QLoRA (Dettmers et al. 2023): the frozen base is quantized, and the adapters stay fp32. The
quantization is gasungbi's weight-only one (:mod:`gasungbi.infer.quant`: int8 per output row, or
int4 in groups), done while the checkpoint is read, one tensor at a time, on the tensors that
``--quant`` quantizes for generation (every projection but MLA's ``kv_b_proj``, the routed
experts, the output head unless tied). Deviation, stated: QLoRA's NF4 data type and double
quantization are not used. A quantized matrix is dequantized for its product in the forward and
again in the backward (:class:`FrozenQuantMatmul`), so only the quantized weights stay in memory.

Targets are module-name suffixes (PEFT's ``target_modules``); the default is the attention and MLP
projections (the dense MLPs and the shared experts). Not adapted:
  * routed experts: stacked [E, ...] tensors, not modules (PEFT does not target them by default);
  * MLA's ``kv_b_proj``: the absorbed attention reads its weight as a matrix;
  * the MTP modules (transformers' models have none, so an adapter there has no PEFT name). SFT's
    MTP loss still reaches the main layers' adapters through their hidden states.
The routing bias of MoE layers is part of the frozen base: a LoRA run makes no balancing update.

Files: adapters are written in PEFT's format, ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, ``base_model_name_or_path``...) and ``adapter_model.safetensors`` with the keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (gasungbi's module names are the
Hugging Face ones), so transformers with peft loads them onto the base; :func:`export_merged`
writes W0 + (alpha / r) B A in the Hugging Face layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gasungbi import atomic
from gasungbi.infer.quant import EXPERT_PROJS, dequantize_int4, dequantize_int8, portable_layout, quant_targets
from gasungbi.infer.quant_modules import portable_buffers
from gasungbi.interop.hf import copy_tokenizer, load_model, save_model
from gasungbi.model.accounting import count_params
from gasungbi.model.layers import swiglu
from gasungbi.model.moe import Experts, dispatch, expert_counts
from gasungbi.model.transformer import Transformer, build_model

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                   "gate_proj", "up_proj", "down_proj")
"""The attention projections (GQA's and MLA's) and the MLP projections."""
NOT_ADAPTED = ("kv_b_proj",)  # read as a matrix by the absorbed MLA
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name of the wrapped model
QUANT_GROUP_SIZE = 128


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts: ``rank`` r, ``alpha`` (the update is scaled by alpha / r), the
    ``targets`` (module-name suffixes), ``quant`` (None, or int8/int4 for the frozen base: QLoRA)
    and ``base``, the checkpoint the adapters belong to."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    base: str
    quant: str | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def spec_of(cfg) -> LoraSpec | None:
    """The :class:`LoraSpec` of a run config with ``lora_rank``, ``lora_alpha``, ``lora_targets``,
    ``quant`` and ``init_from`` fields (SFT's and GRPO's); None when ``lora_rank`` is 0."""
    if not cfg.lora_rank:
        return None
    return LoraSpec(cfg.lora_rank, float(cfg.lora_alpha), tuple(cfg.lora_targets), str(cfg.init_from), cfg.quant)


def check_config(cfg, bad) -> None:
    """Call ``bad(message)`` for a run config whose LoRA fields do not go together."""
    if cfg.lora_rank < 0:
        bad(f"lora_rank must be >= 0 (0: no adapters), got {cfg.lora_rank}")
    if cfg.quant is not None and cfg.quant not in ("int8", "int4"):
        bad(f"quant={cfg.quant!r}; choose int8 or int4")
    if not cfg.lora_rank:
        if cfg.quant is not None:
            bad("quant quantizes the frozen base of a LoRA run (QLoRA): add lora_rank (--lora-rank R)")
        return
    if cfg.lora_alpha <= 0:
        bad(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if not cfg.lora_targets:
        bad("lora_targets is empty: name the projections to adapt (module-name suffixes, e.g. q_proj v_proj)")
    if blocked := [t for t in cfg.lora_targets if t.rsplit(".", 1)[-1] in NOT_ADAPTED]:
        bad(f"lora_targets {', '.join(blocked)}: MLA's kv_b_proj is read as a matrix by the absorbed attention "
            "and gets no adapter")
    if not cfg.init_from:
        bad("lora_rank adapts a checkpoint: init_from (--init-from) is required")
    if cfg.precision == "fp8":
        bad("lora_rank trains adapters in fp32 on a frozen base: choose it or precision fp8")
    if getattr(cfg, "optimizer", "adamw") != "adamw":
        bad("lora_rank trains its adapters with AdamW: optimizer must be adamw")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or getattr(cfg, "expert_parallel", 1) > 1:
        bad("lora_rank runs in one process (not under torchrun) for now")


# ---------------------------------------------------------------------------------------------
# the frozen quantized base (QLoRA)
# ---------------------------------------------------------------------------------------------

def _dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A portable quantized matrix (int8 values and per-row scales, or packed int4 and group
    scales) -> [N, K] in ``dtype``."""
    w = dequantize_int8(q, scales) if q.dtype == torch.int8 else dequantize_int4(q, scales)
    return w.to(dtype)


class FrozenQuantMatmul(torch.autograd.Function):
    """y = x W^T for a frozen quantized W, x (M, K): W is dequantized for the product in the forward
    and again in the backward, which saves only the quantized tensors (bitsandbytes' scheme), and
    gives the gradient of x alone. Under autocast the product runs in the autocast dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            y = x.to(dtype) @ _dequantize(q, scales, dtype).t()
        ctx.save_for_backward(q, scales)
        ctx.dtypes = (x.dtype, dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, scales = ctx.saved_tensors
        x_dtype, dtype = ctx.dtypes
        with torch.autocast(dy.device.type, enabled=False):
            dx = (dy.to(dtype) @ _dequantize(q, scales, dtype)).to(x_dtype)
        return dx, None, None


def frozen_quant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ W^T -> (..., N) for a portable quantized W [N, K] (:class:`FrozenQuantMatmul`)."""
    y = FrozenQuantMatmul.apply(x.reshape(-1, x.shape[-1]), q, scales)
    return y.view(*x.shape[:-1], y.shape[-1])


class FrozenQuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is held quantized: the portable ``weight`` (int8, or
    packed int4) and ``weight_scales`` buffers of :mod:`gasungbi.infer.quant`, and a frozen bias."""

    def __init__(self, in_features: int, out_features: int, mode: str, groups: int | None = None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        portable_buffers(self, "weight", (out_features, in_features), mode, groups)
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_quant_linear(x, self.weight, self.weight_scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class FrozenQuantExperts(Experts):
    """Routed experts held quantized and frozen: the portable stacked ``gate_proj``/``up_proj``/
    ``down_proj`` [E, ...] and their ``_scales``, run by the per-expert dispatch (each expert's
    weights dequantized for its own products), with DeepSeek-V4's SwiGLU clamp (``limit``)."""

    def __init__(self, n_experts: int, dim: int, inter: int, layouts: dict[str, tuple[str, int | None]],
                 limit: float | None = None):
        nn.Module.__init__(self)
        shapes = {"gate_proj": (n_experts, inter, dim), "up_proj": (n_experts, inter, dim),
                  "down_proj": (n_experts, dim, inter)}
        for proj, shape in shapes.items():
            portable_buffers(self, proj, shape, *layouts[proj])
        self.n_experts, self.limit = n_experts, limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate = frozen_quant_linear(x, self.gate_proj[e], self.gate_proj_scales[e])
        up = frozen_quant_linear(x, self.up_proj[e], self.up_proj_scales[e])
        return frozen_quant_linear(swiglu(gate, up, self.limit), self.down_proj[e], self.down_proj_scales[e])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        return dispatch(self.expert, x, idx, weights, expert_counts(idx, self.n_experts, counts))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized_base(path: str | os.PathLike, mode: str, device: str | torch.device = "cpu",
                        group_size: int = QUANT_GROUP_SIZE) -> Transformer:
    """The frozen base of a QLoRA run: checkpoint ``path`` quantized to ``mode`` one tensor at a time
    (:func:`gasungbi.infer.load.read_quantizing`), its quantized projections as
    :class:`FrozenQuantLinear` and its routed experts as :class:`FrozenQuantExperts`, the rest fp32,
    on ``device``."""
    from gasungbi.infer.load import read_quantizing

    cfg, qsd = read_quantizing(path, mode, group_size, torch.float32)
    model = build_model(cfg, device="meta")
    linears, experts = quant_targets(model)
    for name in linears:
        lin = model.get_submodule(name)
        layout = portable_layout(qsd, f"{name}.weight", lin.weight.shape)
        if layout is not None:
            _set_module(model, name, FrozenQuantLinear(lin.in_features, lin.out_features, *layout,
                                                       bias=lin.bias is not None))
    for name in experts:
        ex = model.get_submodule(name)
        layouts = {p: portable_layout(qsd, f"{name}.{p}", getattr(ex, p).shape) for p in EXPERT_PROJS}
        if None not in layouts.values():
            E, inter, dim = ex.gate_proj.shape
            _set_module(model, name, FrozenQuantExperts(E, dim, inter, layouts, ex.limit))
    device = torch.device(device)
    model.load_state_dict({k: v.to(device) for k, v in qsd.items()}, strict=True, assign=True)
    if cfg.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model


# ---------------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------------

class _Adapted:
    """The adapter's forward, mixed into a projection's class: base(x) + (alpha / r) B A x.
    ``lora_on`` False (:func:`adapters_off`) gives the base alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.lora_on:
            return y
        return y + self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(y.dtype) * self.scaling


class LoraLinear(_Adapted, nn.Linear):
    """An ``nn.Linear`` (frozen) with a LoRA adapter ``lora_A`` [r, in], ``lora_B`` [out, r]."""


class QLoraLinear(_Adapted, FrozenQuantLinear):
    """A :class:`FrozenQuantLinear` with a LoRA adapter ``lora_A`` [r, in], ``lora_B`` [out, r]."""


_ADAPTED_CLASS = {nn.Linear: LoraLinear, FrozenQuantLinear: QLoraLinear}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for a list of target names: the module's name is one, or ends with '.' + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: Transformer, spec: LoraSpec, seed: int = 0) -> Transformer:
    """Freeze ``model`` and give every projection that ``spec.targets`` names (outside the MTP
    modules) a LoRA adapter, in place: A Kaiming-uniform from a generator seeded with ``seed``, B
    zeros. The model remembers ``spec`` (``model.lora``). ValueError when no projection matches."""
    model.requires_grad_(False)
    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    names = [n for n, m in model.named_modules() if type(m) in _ADAPTED_CLASS and _matches(n, spec.targets)
             and not n.startswith("model.mtp.") and n.rsplit(".", 1)[-1] not in NOT_ADAPTED]
    if not names:
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) in _ADAPTED_CLASS})
        raise ValueError(f"lora_targets {' '.join(spec.targets)} match no projection of this model; its "
                         f"projections: {', '.join(have)}")
    for name in names:
        m = model.get_submodule(name)
        m.__class__ = _ADAPTED_CLASS[type(m)]
        m.lora_A = nn.Linear(m.in_features, spec.rank, bias=False, device=device)
        m.lora_B = nn.Linear(spec.rank, m.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5), generator=gen)
        nn.init.zeros_(m.lora_B.weight)
        m.scaling, m.lora_on = spec.scaling, True
    model.lora = spec
    return model


def adapted_model(spec: LoraSpec, device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    """The base checkpoint ``spec.base`` (fp32, or quantized to ``spec.quant``) with fresh adapters."""
    if spec.quant is not None:
        base = load_quantized_base(spec.base, spec.quant, device)
    else:
        base = load_model(spec.base, device=device, dtype=torch.float32)
    return apply_lora(base, spec, seed)


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module of every projection with an adapter."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Adapted)}


def trained_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters a checkpoint of ``model``'s run saves: the adapters' when it has them, else all."""
    adapted = adapted_modules(model)
    if not adapted:
        return list(model.parameters())
    return [p for m in adapted.values() for p in (m.lora_A.weight, m.lora_B.weight)]


def describe(model: nn.Module) -> str:
    """One line: the adapters, their targets and the share of the parameters that train."""
    spec, adapted = model.lora, adapted_modules(model)
    trained = sum(p.numel() for p in trained_parameters(model))
    base = count_params(model.config).total_with_mtp
    kinds = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    held = f"{spec.quant} (QLoRA)" if spec.quant else "fp32"
    return (f"LoRA r={spec.rank} alpha={spec.alpha:g} on {len(adapted)} projections ({', '.join(kinds)}), base "
            f"held in {held}: {trained:,} trainable parameters ({trained / base:.2%} of the base's {base:,})")


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block ``model`` computes as its base alone (GRPO's reference policy: no copy of
    the base is kept)."""
    adapted = adapted_modules(model).values()
    for m in adapted:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in adapted:
            m.lora_on = True


# ---------------------------------------------------------------------------------------------
# PEFT's files, and the merge
# ---------------------------------------------------------------------------------------------

def is_adapter_dir(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` holds a LoRA adapter (PEFT's files)."""
    return path is not None and (Path(path) / CONFIG_FILE).is_file()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of ``model`` under PEFT's key names, on the CPU."""
    out = {}
    for name, m in adapted_modules(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{PREFIX}{name}.{part}.weight"] = getattr(m, part).weight.detach().to("cpu").contiguous()
    return out


def peft_config(spec: LoraSpec, model: nn.Module) -> dict:
    """``adapter_config.json`` as PEFT writes it for a causal LM; ``target_modules``: the target
    names that matched a projection."""
    matched = sorted({t for t in spec.targets if any(_matches(n, (t,)) for n in adapted_modules(model))})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.base, "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": 0.0, "target_modules": matched, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "use_rslora": False, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapters(model: nn.Module, path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write ``model``'s adapters in PEFT's format into the directory ``path`` (and the tokenizer
    files of ``tokenizer`` beside them)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model)
    atomic.write_file(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic.write_text(path / CONFIG_FILE, json.dumps(peft_config(model.lora, model), indent=2) + "\n")
    if tokenizer is not None:
        copy_tokenizer(tokenizer, path)
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The ``adapter_config.json`` of an adapter directory; ValueError when it is not a LoRA one."""
    file = Path(path) / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable adapter config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA" or not isinstance(cfg.get("r"), int):
        raise ValueError(f"{file}: not a LoRA adapter config (peft_type LORA with an integer r)")
    return cfg


def load_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Fill ``model``'s adapters (made by :func:`apply_lora`) from the PEFT files in ``path``;
    ValueError naming what does not fit (rank, alpha, missing or extra adapters, shapes)."""
    from safetensors.torch import load_file

    cfg, spec = read_adapter_config(path), model.lora
    if cfg["r"] != spec.rank or float(cfg.get("lora_alpha", 8)) != spec.alpha:
        raise ValueError(f"{path} holds adapters of rank {cfg['r']} and alpha {cfg.get('lora_alpha')}; this run "
                         f"has rank {spec.rank} and alpha {spec.alpha:g}")
    saved, want = load_file(str(Path(path) / WEIGHTS_FILE)), adapter_state(model)
    if missing := sorted(set(want) - set(saved)):
        raise ValueError(f"{path}: no adapter for {len(missing)} of this run's projections: {', '.join(missing[:4])}")
    if extra := sorted(set(saved) - set(want)):
        raise ValueError(f"{path}: adapters for projections this run does not adapt: {', '.join(extra[:4])}")
    for name, m in adapted_modules(model).items():
        for part in ("lora_A", "lora_B"):
            w, t = getattr(m, part).weight, saved[f"{PREFIX}{name}.{part}.weight"]
            if t.shape != w.shape:
                raise ValueError(f"{path}: {name}.{part} is {tuple(t.shape)}, this run's is {tuple(w.shape)}")
            with torch.no_grad():
                w.copy_(t)


@torch.no_grad()
def merge_adapters(model: Transformer) -> Transformer:
    """Fold every adapter into its weight, in place (W0 + (alpha / r) B A; the projections become
    plain ``nn.Linear``\\ s again) and unfreeze the model. A quantized base cannot be merged into."""
    for name, m in adapted_modules(model).items():
        if not isinstance(m, LoraLinear):
            raise ValueError(f"{name}: adapters merge into a floating-point base only")
        m.weight += (m.lora_B.weight @ m.lora_A.weight * m.scaling).to(m.weight.dtype)
        del m.lora_A, m.lora_B, m.scaling, m.lora_on
        m.__class__ = nn.Linear
    del model.lora
    return model.requires_grad_(True)


def export_merged(adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """Write the base of ``adapter_dir`` (its ``base_model_name_or_path``, or ``base``) with the
    adapters merged, in the Hugging Face layout at ``out`` (its tokenizer beside it). A QLoRA run's
    adapters merge into the floating-point base, as PEFT users do."""
    cfg = read_adapter_config(adapter_dir)
    base = str(base or cfg.get("base_model_name_or_path") or "")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{adapter_dir}: the base checkpoint {base or '(none named)'} is not a directory "
                                "here; pass it with --base")
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], list) else [cfg["target_modules"]]
    spec = LoraSpec(cfg["r"], float(cfg.get("lora_alpha", 8)), tuple(targets), base)
    model = apply_lora(load_model(base, dtype=torch.float32), spec)
    load_adapters(model, adapter_dir)
    merged = merge_adapters(model)
    tokenizer = adapter_dir if (Path(adapter_dir) / "tokenizer.json").exists() else base
    return atomic.write_dir(Path(out).resolve(), lambda tmp: save_model(merged, tmp, tokenizer=tokenizer))

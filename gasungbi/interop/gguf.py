"""GGUF export: a checkpoint as one file that llama.cpp (and Ollama on top of it) runs.

Written with the ``gguf`` package (llama.cpp's own writer), following the layout llama.cpp's
``convert_hf_to_gguf.py`` gives the same models:

* MLA/MoE checkpoints (DeepSeek-V2/V3 and ours) as architecture ``deepseek2``. MLA goes in as
  llama.cpp's absorbed form: MQA with one KV head whose key is the latent plus the rope key
  (``key_length = kv_lora_rank + qk_rope_head_dim``), and ``kv_b_proj`` split per head into
  ``attn_k_b`` [H, r, d_nope] (W^UK, transposed) and ``attn_v_b`` [H, d_v, r] (W^UV). Routed experts
  are stacked ([E, I, d] as we store them), the router's correction bias is ``exp_probs_b``,
  scoring ``expert_gating_func`` (sigmoid for V3, softmax for V2), then group-limited routing, routed
  scaling, top-k normalization, shared experts and the leading dense blocks. YaRN keys as the
  converter writes them (``yarn_log_mul`` = 0.1 x mscale_all_dim). MTP modules are not written:
  llama.cpp's deepseek2 graph has no use for them (its converter skips them too).
* DeepSeek-V4 as ``deepseek4`` (llama.cpp's ``conversion/deepseek.py`` and ``src/models/deepseek4.cpp``):
  its tensors under llama.cpp's names (:data:`V4_TENSORS`; experts stacked, the hash layers' token ->
  experts tables as I32), the per-layer compression ratios (0 / 4 / 128), the indexer, hyper-connection,
  hash-layer and SwiGLU-clamp keys, YaRN on the compressed layers. llama.cpp's graph takes 4 streams and
  the rates 4 (CSA) and 128 (HCA) only: other configurations are refused. MTP is not written.
* Dense (Llama-style) checkpoints as ``llama``; Q and K rows are permuted from the Hugging Face
  rotate-half layout to llama.cpp's adjacent pairs, as the converter does.
* The tokenizer whole: byte-level BPE vocabulary ("gpt2" model), merges, the pre-tokenizer llama.cpp
  must apply (read from tokenizer.json), token types (special tokens are control tokens), BOS/EOS/PAD
  ids, whether BOS is added (the tokenizer's own rule) and the chat template.

Types: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices; vectors (norms, biases, the
router's bias) stay f32, and so do the router and, under q8_0, the per-head MLA factors ``attn_k_b`` /
``attn_v_b`` and any matrix whose rows are not a multiple of 32 (f16 there): see :data:`KEEP_FLOAT`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gasungbi.config import ModelConfig

DTYPES = ("f32", "f16", "bf16", "q8_0")

# Matrices that stay in float under q8_0: the router (tiny; its scores decide which experts run, and
# the converter keeps it f32 too) and MLA's per-head factors attn_k_b / attn_v_b, which every head's
# attention goes through twice, so their rounding error costs more top-1 agreement than the bytes
# they save are worth.
KEEP_FLOAT = ("attn_k_b", "attn_v_b", "ffn_gate_inp")

# DeepSeek-V3.2's indexer tensors: ours (transformers') -> llama.cpp's (blk.N.indexer.*)
INDEXER_NAMES = {"wq_b": "attn_q_b", "wk": "attn_k", "k_norm": "k_norm", "weights_proj": "proj"}

# DeepSeek-V4: ours (transformers') -> llama.cpp's deepseek4 names (top level, then blk.N.*)
V4_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight", "model.hc_head.hc_fn": "output_hc_fn.weight",
          "model.hc_head.hc_base": "output_hc_base.weight", "model.hc_head.hc_scale": "output_hc_scale.weight"}
_V4_COMPRESSOR = {"position_bias": "ape", "kv_proj.weight": "kv", "gate_proj.weight": "gate", "kv_norm.weight": "norm"}
V4_TENSORS = {
    **{f"{s}_hc.{p}": f"hc_{s}_{p}.weight" for s in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.sinks": "attn_sinks.weight", "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_norm.weight": "attn_q_a_norm.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_proj.weight": "attn_kv.weight", "self_attn.kv_norm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_a_proj.weight": "attn_output_a.weight", "self_attn.o_b_proj.weight": "attn_output_b.weight",
    **{f"self_attn.compressor.{a}": f"attn_compressor_{b}.weight" for a, b in _V4_COMPRESSOR.items()},
    **{f"self_attn.compressor.indexer.{a}": f"indexer_compressor_{b}.weight" for a, b in _V4_COMPRESSOR.items()},
    "self_attn.compressor.indexer.q_b_proj.weight": "indexer.attn_q_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "indexer.proj.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"mlp.shared_experts.{p}_proj.weight": f"ffn_{p}_shexp.weight" for p in ("gate", "up", "down")},
    **{f"mlp.experts.{p}_proj": f"ffn_{p}_exps.weight" for p in ("gate", "up", "down")},
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.gate.tid2eid": "ffn_gate_tid2eid.weight",
}


class GGUFExportError(ValueError):
    """A checkpoint that cannot be written as GGUF; the message says what is missing or unsupported."""


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32",
                progress: Callable[[str], None] | None = None) -> Path:
    """Write ``checkpoint`` (a Hugging Face-layout directory with tokenizer.json) as a GGUF file, and an
    Ollama ``Modelfile`` beside it. Returns the GGUF path."""
    import gguf

    from gasungbi.interop.hf import load_model

    if dtype not in DTYPES:
        raise GGUFExportError(f"unknown GGUF type {dtype!r}; choose from {', '.join(DTYPES)}")
    checkpoint, out = Path(checkpoint), Path(out)
    tok = read_tokenizer(checkpoint)
    model = load_model(checkpoint, "cpu", torch.float32)
    cfg = model.config
    arch = ("deepseek32" if cfg.has_indexer else "deepseek2") if cfg.is_mla else cfg.model_type  # llama, qwen2, qwen3
    if cfg.is_mla and not cfg.rope_interleave:
        raise GGUFExportError(f"{checkpoint}: MLA with rotate-half rope (rope_interleave=false) is not exported")
    if cfg.is_v4:
        arch = "deepseek4"
        if cfg.hc_mult != 4 or cfg.compress_rate_csa != 4 or cfg.compress_rate_hca != 128:
            raise GGUFExportError(f"{checkpoint}: llama.cpp's deepseek4 runs hc_mult 4 and compression rates 4 (CSA) "
                                  f"and 128 (HCA) only; this model has hc_mult {cfg.hc_mult}, rates "
                                  f"{cfg.compress_rate_csa} and {cfg.compress_rate_hca}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(checkpoint.resolve().name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    _hparams(writer, cfg, gguf)
    _tokenizer(writer, tok, cfg)
    n = 0
    for name, array in (_v4_tensors(model) if cfg.is_v4 else _tensors(model, arch)):
        if array.dtype == np.int32:  # DeepSeek-V4's token -> experts tables
            writer.add_tensor(name, array)
            n += 1
            continue
        qtype = _type_for(name, array, dtype, gguf)
        data = _convert(array, qtype, gguf)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (gguf.GGMLQuantizationType.F32,
                                                                          gguf.GGMLQuantizationType.F16) else None)
        n += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    modelfile = write_modelfile(out, tok)
    if progress:
        progress(f"wrote {out} ({arch}, {n} tensors, {dtype}, {out.stat().st_size / 2**20:.1f} MiB) and {modelfile}")
    return out


# ---------------------------------------------------------------------------------------------
# hyperparameters
# ---------------------------------------------------------------------------------------------

def _hparams(w, cfg: ModelConfig, gguf) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    _rope_scaling(w, cfg, gguf)
    if cfg.is_v4:
        _v4_hparams(w, cfg, gguf)
        return
    if not cfg.is_mla:
        w.add_head_count_kv(cfg.gqa_kv_heads)
        w.add_rope_dimension_count(cfg.gqa_head_dim)
        w.add_key_length(cfg.gqa_head_dim)
        w.add_value_length(cfg.gqa_head_dim)
        return
    w.add_head_count_kv(1)  # MLA as MQA over the latent
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    # llama.cpp requires the key unless the model has 26 or 27 layers (how it recognizes V2-Lite);
    # 0 selects the plain query projection (attn_q), as V2-Lite has
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    if cfg.n_group > 1 and cfg.topk_method != "greedy":
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    scaling = cfg.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(scaling["mscale_all_dim"]))
    if cfg.has_indexer:
        w.add_uint32("deepseek32.attention.indexer.head_count", cfg.index_n_heads)
        w.add_uint32("deepseek32.attention.indexer.key_length", cfg.index_head_dim)
        w.add_uint32("deepseek32.attention.indexer.top_k", cfg.index_topk)


def _v4_hparams(w, cfg: ModelConfig, gguf) -> None:
    """DeepSeek-V4's keys, as llama.cpp's loader reads them (names not in the gguf package are literal)."""
    A, L = "deepseek4", cfg.num_hidden_layers
    w.add_head_count_kv(1)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_q_lora_rank(cfg.q_lora_rank)
    if cfg.rope_scaling:
        w.add_rope_scaling_yarn_beta_fast(float(cfg.rope_scaling.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(cfg.rope_scaling.get("beta_slow") or 1))
    w.add_uint32(f"{A}.attention.output_lora_rank", cfg.o_lora_rank)
    w.add_uint32(f"{A}.attention.output_group_count", cfg.o_groups)
    w.add_array(f"{A}.attention.compress_ratios", [cfg.compress_rate(i) for i in range(L)])
    w.add_float32(f"{A}.attention.compress_rope_freq_base", cfg.compress_rope_theta)
    w.add_uint32(f"{A}.attention.sliding_window", cfg.sliding_window)
    w.add_uint32(f"{A}.attention.indexer.head_count", cfg.index_n_heads)
    w.add_uint32(f"{A}.attention.indexer.key_length", cfg.index_head_dim)
    w.add_uint32(f"{A}.attention.indexer.top_k", cfg.index_topk)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(True)
    if cfg.scoring_func != "sqrtsoftplus":
        raise GGUFExportError(f"llama.cpp's deepseek4 routes by sqrt(softplus) only, not {cfg.scoring_func}")
    w.add_uint32(f"{A}.expert_gating_func", 4)  # sqrt(softplus)
    w.add_uint32(f"{A}.hash_layer_count", cfg.num_hash_layers)
    w.add_array(f"{A}.swiglu_clamp_exp", [float(cfg.swiglu_limit)] * L)
    w.add_uint32(f"{A}.hyper_connection.count", cfg.hc_mult)
    w.add_uint32(f"{A}.hyper_connection.sinkhorn_iterations", cfg.hc_sinkhorn_iters)
    w.add_float32(f"{A}.hyper_connection.epsilon", cfg.hc_eps)


def _rope_scaling(w, cfg: ModelConfig, gguf) -> None:
    s = cfg.rope_scaling
    if not s:
        return
    kind = s.get("rope_type", s.get("type"))
    if kind != "yarn":
        raise GGUFExportError(f"rope scaling {kind!r} is not exported (only YaRN is)")
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(s["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

def _tensors(model, arch: str):
    """(GGUF name, float32 numpy array) for every tensor llama.cpp reads, MTP modules left out."""
    import gguf

    cfg = model.config
    # deepseek32 is deepseek2 plus the indexer, whose names the gguf package does not know yet
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, "DEEPSEEK2" if arch == "deepseek32" else arch.upper()),
                                     cfg.num_hidden_layers)
    sd = model.state_dict()
    for key, t in sd.items():
        if key.startswith("model.mtp.") or (cfg.tie_word_embeddings and key == "lm_head.weight"):
            continue
        t = t.detach().float()
        if key.endswith("kv_b_proj.weight"):  # split per head: W^UK (transposed) and W^UV
            H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
            kv = t.view(H, dn + dv, cfg.kv_lora_rank)
            k_b, v_b = kv.split([dn, dv], dim=1)
            base = key.removesuffix("kv_b_proj.weight")
            yield _name(names, base + "k_b_proj.weight"), k_b.transpose(1, 2).contiguous().numpy()
            yield _name(names, base + "v_b_proj.weight"), v_b.contiguous().numpy()
            continue
        if arch == "llama" and key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) \
                and not cfg.rope_interleave:
            heads = cfg.num_attention_heads if key.endswith("q_proj.weight") else cfg.gqa_kv_heads
            t = _rotate_half_to_pairs(t, heads)
        if ".self_attn.indexer." in key:  # DeepSeek-V3.2's lightning indexer, as llama.cpp names it
            layer, rest = key.removeprefix("model.layers.").split(".self_attn.indexer.")
            yield f"blk.{layer}.indexer.{INDEXER_NAMES[rest.rsplit('.', 1)[0]]}.{rest.rsplit('.', 1)[1]}", \
                t.contiguous().numpy()
            continue
        if key.endswith("e_score_correction_bias"):
            key = key.replace("e_score_correction_bias", "e_score_correction.bias")
        elif key.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            key = key + ".weight"
        yield _name(names, key), t.contiguous().numpy()


def _v4_tensors(model):
    """(GGUF name, numpy array) of DeepSeek-V4's tensors: float32, the hash tables int32."""
    for key, t in model.state_dict().items():
        if key in V4_TOP:
            yield V4_TOP[key], t.detach().float().contiguous().numpy()
            continue
        layer, rest = key.removeprefix("model.layers.").split(".", 1)
        t = t.detach()
        yield f"blk.{layer}.{V4_TENSORS[rest]}", (t.to(torch.int32) if rest.endswith("tid2eid") else t.float()).contiguous().numpy()


def _name(names, key: str) -> str:
    stem, _, suffix = key.rpartition(".")
    mapped = names.get_name(stem)
    if mapped is None:
        raise GGUFExportError(f"no GGUF name for tensor {key}")
    return f"{mapped}.{suffix}"


def _rotate_half_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Q/K projection from the rotate-half layout (x_i, x_{i+d/2}) to adjacent pairs."""
    out, d = w.shape
    return w.view(heads, 2, out // heads // 2, d).transpose(1, 2).reshape(out, d)


def _type_for(name: str, array: np.ndarray, dtype: str, gguf):
    T = gguf.GGMLQuantizationType
    if array.ndim < 2 or name.endswith(".bias") or dtype == "f32" or "ffn_gate_inp" in name \
            or "indexer.proj" in name:  # the router and the indexer's head weights: F32, as the converter writes them
        return T.F32
    if "hc_" in name or "_ape." in name:  # DeepSeek-V4's hyper-connection projections and position biases
        return T.F32
    if dtype == "q8_0":
        if any(k in name for k in KEEP_FLOAT) or array.shape[-1] % 32:
            return T.F16
        return T.Q8_0
    return {"f16": T.F16, "bf16": T.BF16}[dtype]


def _convert(array: np.ndarray, qtype, gguf) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

def read_tokenizer(checkpoint: Path) -> dict:
    """What GGUF needs of a checkpoint's tokenizer files: vocabulary, merges, special tokens, BOS rule,
    chat template, pre-tokenizer."""
    f = checkpoint / "tokenizer.json"
    if not f.is_file():
        raise GGUFExportError(f"{checkpoint} has no tokenizer.json: GGUF files carry their tokenizer")
    from gasungbi.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(checkpoint)  # the tokenizers library's own checks, naming the file
    except ValueError as e:
        raise GGUFExportError(str(e)) from None
    data = _json(f)
    model = data.get("model") or {}
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else model
        raise GGUFExportError(f"{f}: only byte-level BPE tokenizers are exported, this one is {kind!r}")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges", []), list) \
            or not isinstance(data.get("added_tokens", []), list):
        raise GGUFExportError(f"{f}: not a valid tokenizer.json (its BPE model needs a vocab and a list of merges)")
    config = _json(checkpoint / "tokenizer_config.json")
    template_file = checkpoint / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    gen = _json(checkpoint / "generation_config.json")
    added = {a["content"]: a for a in data.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(role: str) -> str | None:
        v = config.get(role)
        return v.get("content") if isinstance(v, dict) else v

    return {"vocab": model["vocab"], "merges": merges, "added": added, "template": template,
            "bos": special("bos_token"), "eos": special("eos_token"), "pad": special("pad_token"),
            "add_bos": _adds_bos(checkpoint, special("bos_token") or _gasungbi_bos(added)), "eos_ids": gen.get("eos_token_id"),
            "pre": _pre_tokenizer(data, f)}


def _gasungbi_bos(added: dict) -> str | None:
    """gasungbi's tokenizer names no bos_token in an older tokenizer_config.json: its <|bos|>."""
    return "<|bos|>" if "<|bos|>" in added else None


def _json(path: Path) -> dict:
    """A JSON object file's contents ({} when there is no file); a GGUFExportError naming it otherwise."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GGUFExportError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GGUFExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _adds_bos(checkpoint: Path, bos: str | None) -> bool:
    """The tokenizer's own rule, as gasungbi and transformers apply it (gasungbi.data.conventions):
    whether encoding text puts the BOS token in front."""
    from gasungbi.data.conventions import Conventions

    conv = Conventions.load(checkpoint)
    bos_id = conv.tokenizer.token_to_id(bos) if bos else None
    ids = conv.encode("a")
    return bos_id is not None and bool(ids) and ids[0] == bos_id


def _pre_tokenizer(data: dict, f: Path) -> str:
    """The llama.cpp name of the tokenizer's pre-tokenization: GPT-2's byte-level regex split is
    "gpt-2", single digits split off before it (StarCoder's, and gasungbi's own) "starcoder"; the
    Llama-3, DeepSeek-V3 and Qwen2 splits are recognized by their regexes."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "starcoder"
    regexes = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    joined = " ".join(regexes)
    if "\\p{N}{1,3}" in joined and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in joined:
        return "llama-bpe"
    if "\\p{N}{1,3}" in joined and "[一-龥぀-ゟ゠-ヿ]+" in joined:
        return "deepseek-v3"
    if "\\p{N}|" in joined and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in joined:
        return "qwen2"  # single digits (Qwen2, Qwen3 and the R1 distills)
    raise GGUFExportError(f"{f}: pre-tokenizer {kinds} is not one llama.cpp is known to apply the same way "
                          "(supported: GPT-2 byte-level, with single digits split off first, Llama-3, DeepSeek-V3, Qwen2)")


def _tokenizer(w, tok: dict, cfg: ModelConfig) -> None:
    import gguf

    T = gguf.TokenType
    by_id = {i: s for s, i in tok["vocab"].items()}
    for s, a in tok["added"].items():
        by_id[a["id"]] = s
    tokens, types = [], []
    for i in range(cfg.vocab_size):  # the embedding may be padded past the tokenizer
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(s)
            a = tok["added"].get(s)
            types.append(T.NORMAL if a is None else T.CONTROL if a.get("special") else T.USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(tok["merges"])
    ids = {s: i for i, s in enumerate(tokens)}
    bos = ids.get(tok["bos"]) if tok["bos"] else cfg.bos_token_id
    eos = tok["eos_ids"] if tok["eos_ids"] is not None else (ids.get(tok["eos"]) if tok["eos"] else cfg.eos_token_id)
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if tok["pad"] and tok["pad"] in ids:
        w.add_pad_token_id(ids[tok["pad"]])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(False)
    if "<|end|>" in ids and tok["template"] and "<|end|>" in tok["template"]:
        w.add_eot_token_id(ids["<|end|>"])  # gasungbi's chat turns end with <|end|>
    if tok["template"]:
        w.add_chat_template(tok["template"])


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------

# gasungbi's own chat format (gasungbi.data.conventions) in Ollama's Go template language
OLLAMA_TEMPLATE = ('{{- if .System }}<|system|>{{ .System }}<|end|>{{ end }}'
                   '{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>')


def write_modelfile(gguf_file: Path, tok: dict) -> Path:
    """An Ollama ``Modelfile`` beside the GGUF: ``FROM``, the chat template and the stop tokens. For
    gasungbi's own chat format the template is written in Ollama's Go template language; for another
    template Ollama reads the Jinja template stored in the GGUF itself."""
    ours = "<|assistant|>" in (tok["template"] or "") and "<|end|>" in (tok["template"] or "")
    stops = [s for s in ("<|end|>", tok["eos"]) if s and (s in tok["added"] or s in tok["vocab"])]
    lines = [f"FROM ./{gguf_file.name}"]
    if ours:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    else:
        lines.append("# the chat template is the one stored in the GGUF (tokenizer.chat_template)")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    path = modelfile_path(gguf_file)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def modelfile_path(gguf_file: Path) -> Path:
    """Where the Modelfile of ``gguf_file`` goes: ``Modelfile`` beside it, unless a Modelfile for
    another file (or one written by hand) is there already; then ``<name>.Modelfile``
    (``ollama create -f`` takes either)."""
    path = Path(gguf_file).parent / "Modelfile"
    try:
        ours = not path.exists() or path.read_text(encoding="utf-8").startswith(f"FROM ./{Path(gguf_file).name}\n")
    except (OSError, UnicodeDecodeError):
        ours = False
    return path if ours else path.with_name(f"{Path(gguf_file).stem}.Modelfile")


def open_in_llama_cpp(path: str | Path, **kwargs):
    """``llama_cpp.Llama`` on a GGUF (llama-cpp-python, an optional dependency: tests and benchmarks).

    On a CPU with AMX (``AMX_INT8 = 1`` in llama.cpp's system info), llama.cpp's extra weight
    buffers are turned off (``use_extra_bufts``, the CLI's ``--no-repack``): llama-cpp-python
    0.3.36 built with ``GGML_NATIVE=ON`` on a Xeon with AMX aborts (``GGML_ASSERT(*cur_backend_id !=
    -1)``) or segfaults on q8_0 files, llama.cpp's own converter's as well as ours. Elsewhere it opens
    as llama.cpp's defaults have it. Returns the model and whether the buffers were turned off."""
    import llama_cpp
    import llama_cpp.llama_cpp as capi

    amx = "AMX_INT8 = 1" in capi.llama_print_system_info().decode(errors="replace")
    if not amx:
        return llama_cpp.Llama(model_path=str(path), **kwargs), False
    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params  # read by Llama.__init__ (no keyword for it)
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs), True
    finally:
        capi.llama_model_default_params = default

"""The decoder: blocks, the causal LM, and multi-token prediction (MTP).

Single-device PyTorch. Parameter names equal the Hugging Face ones (``model.layers.3.self_attn.
kv_b_proj.weight``...), except that routed experts are stacked tensors and MTP modules live in
``model.mtp``; ``gasungbi.interop.hf`` maps both to and from the HF checkpoint layout.

MTP (DeepSeek-V3 Sec. 2.2, eq. 21-23). Depth k = 1..D combines the previous depth's hidden state
at position i with the embedding of token i+k:
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]      (eh_proj)
    h^k    = TRM_k(h'^k),   P_{i+k+1}^k = OutHead(RMSNorm(h^k))     (shared head)
Deviation from the paper's notation, following the released checkpoint and the serving engines
(vLLM, SGLang): the concatenation order is [embedding ; hidden], and h^0 is the main model's output
after its final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from gasungbi.config import ModelConfig
from gasungbi.model.attention import GQA, MLA, DecodeContext, RotaryEmbedding, rope_frequencies
from gasungbi.model.deepseek_v4 import DeepseekV4
from gasungbi.model.layers import MLP, RMSNorm
from gasungbi.model.moe import Experts, MoE, Router, RoutingStats


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx) if cfg.is_mla else GQA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer_idx) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, ctx: DecodeContext | None = None,
                stats: RoutingStats | None = None) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); ``ctx`` when decoding, ``stats`` to collect routing statistics."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx=ctx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, stats=stats) if isinstance(self.mlp, MoE) else self.mlp(h))


class SharedHead(nn.Module):
    """The per-MTP-module final norm; the output matrix itself is the model's ``lm_head``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: ``enorm``/``hnorm``/``eh_proj`` then a full block (V3 Sec. 2.2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                ctx: DecodeContext | None = None,
                stats: RoutingStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h^k, RMSNorm(h^k)) [B, T, d] from Emb(t_{i+k}) and h^{k-1} [B, T, d]; one forward so FSDP2
        unshards once. ``ctx``: the module's own cache slot when it drafts for speculative decoding."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(hidden)), dim=-1))  # [Emb ; h] as the release
        h = super().forward(x, cos, sin, ctx=ctx, stats=stats)
        return h, self.shared_head.norm(h)


class Backbone(nn.Module):
    """Embedding, blocks, final norm, and the MTP modules (HF: ``model.*``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        rope_dim = cfg.qk_rope_head_dim if cfg.is_mla else cfg.gqa_head_dim
        self.rotary = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling)


class Transformer(nn.Module):
    """A causal language model: ``model(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: ModelConfig, init: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, embedding and expert; ones for norms;
        zeros for biases and the routing correction bias. DeepSeek-V3 used std 0.006 for all
        learnable parameters (V3 Sec. 4.2); small presets use 0.02 as GPT-2/Llama do."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, nn.LayerNorm):  # the V3.2 indexer's key norm
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, Router):
                m.weight.normal_(0.0, std, generator=generator)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                for p in (m.gate_proj, m.up_proj, m.down_proj):
                    p.normal_(0.0, std, generator=generator)

    def hidden_states(self, input_ids: torch.Tensor, *, ctx: DecodeContext | None = None,
                      stats: RoutingStats | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, d] for tokens at cache slots ctx.start_pos..

        ``ctx.positions`` [B, T] and ``ctx.mask`` place left-padded rows (the decode engine computes
        both); without them, position = slot and attention is causal. ``stats`` collects the MoE
        layers' routing statistics (training).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq], "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if ctx is not None and ctx.positions is not None:
            positions = ctx.positions
        else:
            start_pos = ctx.start_pos if ctx is not None else 0
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        cos, sin = self.model.rotary(positions)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, ctx=ctx, stats=stats)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, *, ctx: DecodeContext | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, ctx=ctx))

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, *,
                   stats: RoutingStats | None = None) -> list[torch.Tensor]:
        """Final-normed MTP hidden states for training. Depth k returns [B, T-k, d]: row i predicts
        token i+k+1, i.e. it is scored against ``targets[:, k:]`` where targets are the next tokens."""
        outs, h = [], hidden
        T = input_ids.shape[1]
        for k, module in enumerate(self.model.mtp, start=1):
            emb = self.model.embed_tokens(input_ids[:, k:])  # token i+k for row i
            cos, sin = self.model.rotary(torch.arange(T - k, device=input_ids.device))
            h, normed = module(emb, h[:, : T - k], cos, sin, stats=stats)
            outs.append(normed)
        return outs

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each MTP depth (see :meth:`mtp_hidden`)."""
        return [self.lm_head(h) for h in self.mtp_hidden(hidden, input_ids)]

    def moe_layers(self) -> list[MoE]:
        """The MoE layers in layer order (main layers, then MTP modules)."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffer (rotary frequencies) on the weights' device: needed
        after meta-device construction or ``load_state_dict(assign=True)``."""
        device = self.lm_head.weight.device
        rotary = self.model.rotary
        rotary.inv_freq = rope_frequencies(2 * rotary.inv_freq.shape[0], self.config.rope_theta,
                                           self.config.rope_scaling)[0].to(device)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None) -> Transformer:
    """Construct on the meta device, materialize on ``device`` in ``dtype``, then initialize. DeepSeek-V4
    configs build a :class:`~gasungbi.model.deepseek_v4.DeepseekV4` (the same interface).

    ``device="meta"`` gives a shape-only model (for accounting of the published sizes).
    """
    with torch.device("meta"):
        model = (DeepseekV4 if cfg.is_v4 else Transformer)(cfg, init=False)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    model.reset_buffers()
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.init_weights(gen)
    return model.to(dtype)


def from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], strict: bool = True) -> Transformer:
    """A Transformer that holds ``state``'s tensors themselves (no copies, their device and dtype):
    built on the meta device, loaded with ``assign=True``, the tied head re-tied and the non-persistent
    buffers recomputed on the weights' device. One place for what every loader needs."""
    model = build_model(cfg, device="meta")
    model.load_state_dict(state, assign=True, strict=strict)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model

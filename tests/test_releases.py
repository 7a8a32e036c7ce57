"""The architectures of DeepSeek's releases beside transformers, on tiny random checkpoints that
transformers writes: Qwen2 (the R1-Distill-Qwen models), Qwen3 (R1-0528-Qwen3-8B), DeepSeek-V3.2
(sparse attention: each query attends to the 8 keys its lightning indexer chooses) and DeepSeek-V4
(a sliding window with compressed entries, sparse (CSA) and dense (HCA), hyper-connections, hash routing).

For each: greedy decoding through gasungbi's engine equals transformers' ``generate`` over 64 new
tokens (crossing Qwen2's sliding window), alone, in a left-padded batch and with the compiled step;
the server gives the same tokens to the official ``openai`` client; llama.cpp runs the GGUF export;
the presets count the parameters transformers builds. Logit parity and the round trip through
``save_model`` are in ``test_hf_parity.py``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gasungbi.config import to_hf_config  # noqa: E402
from gasungbi.data.tokenizer import save_tokenizer  # noqa: E402
from gasungbi.infer.generate import generate  # noqa: E402
from gasungbi.interop.hf import load_model  # noqa: E402
from gasungbi.model.accounting import count_params  # noqa: E402
from gasungbi.presets import get_preset  # noqa: E402
from conftest import v4_reference  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.25, bos_token_id=0, eos_token_id=1)
ARCHS = {
    "qwen2": ("Qwen2", dict(COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=16,
                            max_window_layers=1, tie_word_embeddings=True)),
    "deepseek_v32": ("DeepseekV32", dict(COMMON, num_hidden_layers=2, num_key_value_heads=4, moe_intermediate_size=16,
                                         n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
                                         topk_group=1, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
                                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, index_n_heads=16,
                                         index_head_dim=16, index_topk=8)),
    "qwen3": ("Qwen3", dict(COMMON, num_hidden_layers=2, head_dim=16, attention_bias=True,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                             "original_max_position_embeddings": 64})),
}
ARCHS["deepseek_v4"] = ("DeepseekV4", {})
V4_DECODE = dict(sliding_window=8, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
                 index_topk=4)
"""DeepSeek-V4 over 64 new tokens: a window of 8, CSA at 4 (its indexer keeping 4 of up to 18 entries), HCA at 16."""
PROMPTS = [[0, 5, 9, 13, 200], [0, 44, 3, 19, 71, 2, 8, 90, 31, 6, 17], [0, 7]]


def _release(name: str, tokenizer, root):
    """(name, checkpoint path, transformers model) with non-trivial norms, biases and routing biases
    (DeepSeek-V4: every constant transformers initializes, ``conftest.v4_reference``)."""
    if name == "deepseek_v4":
        return _saved(name, v4_reference(vocab_size=tokenizer.get_vocab_size(), **V4_DECODE), tokenizer, root)
    family, kwargs = ARCHS[name]
    cfg = getattr(transformers, f"{family}Config")(vocab_size=tokenizer.get_vocab_size(), **kwargs)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("norm.weight", ".bias")):
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)
    return _saved(name, hf, tokenizer, root)


def _saved(name, hf, tokenizer, root):
    path = root / "ckpt"
    hf.save_pretrained(path)
    save_tokenizer(tokenizer, path)
    hf.generation_config.eos_token_id = None  # the full length, as stop_tokens=()
    hf.generation_config.pad_token_id = 2
    return name, path, hf


@pytest.fixture(scope="module", params=list(ARCHS))
def release(request, tokenizer, tmp_path_factory):
    return _release(request.param, tokenizer, tmp_path_factory.mktemp(request.param))


def _reference(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_decode_equals_transformers(release, one_thread):
    """64 new tokens per prompt, alone and in one left-padded batch (the sliding window, 16 tokens,
    is crossed; DeepSeek-V4's window and both compression rates too), and through the compiled step
    (dynamo's graph, called as the engine calls it). Each row is compared with transformers run on
    that prompt alone (transformers' own left-padded V4 batches pool the padding into its windows)."""
    from gasungbi.infer import engine as E

    _, path, hf = release
    model = load_model(path)
    refs = [_reference(hf, p, 64) for p in PROMPTS]
    batch = generate(model, PROMPTS, max_new_tokens=64, stop_tokens=())
    assert [c.tokens for c in batch] == refs
    assert [generate(model, p, max_new_tokens=64, stop_tokens=())[0].tokens for p in PROMPTS] == refs
    E._COMPILED[model] = E.CompiledStep(torch.device("cpu"), backend="eager")
    compiled = generate(model, PROMPTS, max_new_tokens=64, stop_tokens=(), compile=True)
    assert [c.tokens for c in compiled] == refs


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v4"])
def test_server_answers_the_openai_client_with_the_same_tokens(arch, tokenizer, tmp_path, start_server):
    """Through the server (the engine is the one every path shares; DeepSeek-V4's cache is kept by
    position, not by slot)."""
    openai = pytest.importorskip("openai")
    _, path, hf = _release(arch, tokenizer, tmp_path)
    server = start_server(path)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.completions.create(model="ckpt", prompt=PROMPTS[1], max_tokens=24, temperature=0)
    from gasungbi.data.tokenizer import load_tokenizer
    assert r.choices[0].text == load_tokenizer(path).decode(_reference(hf, PROMPTS[1], 24), skip_special_tokens=False)


@pytest.mark.parametrize("preset", ["r1-distill-qwen-1.5b", "r1-distill-qwen-7b", "r1-distill-qwen-14b",
                                    "r1-distill-qwen-32b", "r1-0528-qwen3-8b", "deepseek-v3.2", "deepseek-v4-flash",
                                    "deepseek-v4-pro", "v4-tiny"])
def test_preset_parameter_count_equals_transformers(preset):
    """``gasungbi params``' main-model total is what transformers builds from the same config.json
    (on the meta device)."""
    cfg = get_preset(preset)
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert count_params(cfg).total == sum(p.numel() for p in hf.parameters())


def test_thinking_switches_render_as_transformers_does(tokenizer):
    """DeepSeek-V3.1's ``thinking`` and Qwen3's ``enable_thinking`` reach the checkpoint's template as
    ``apply_chat_template``'s keyword arguments (vLLM's ``chat_template_kwargs``), and R1's template
    opens the reply with <think>."""
    from gasungbi.data.conventions import Conventions

    templates = {
        "v3.1": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
                 "{% else %}<|Assistant|></think>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|Assistant|>{% if thinking is defined and thinking %}<think>"
                 "{% else %}</think>{% endif %}{% endif %}"),
        "qwen3": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"),
        "r1": ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"),
    }
    messages = [{"role": "user", "content": "2+2?"}]
    for name, template in templates.items():
        conv = Conventions(tokenizer, template, {"bos_token": "<|bos|>"})
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|bos|>")
        hf_tok.chat_template = template
        for kwargs in ({}, {"thinking": True}, {"thinking": False}, {"enable_thinking": False}):
            ours = conv.render_chat(messages, template_kwargs=kwargs)
            assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    v31 = Conventions(tokenizer, templates["v3.1"], {"bos_token": "<|bos|>"})
    assert v31.render_chat(messages, template_kwargs={"thinking": True}).endswith("<think>")
    assert v31.render_chat(messages).endswith("</think>")
    assert Conventions(tokenizer, templates["r1"], {"bos_token": "<|bos|>"}).render_chat(messages).endswith("<think>\n")


def test_int8_decode_follows_the_float_model(release, one_thread):
    """Weight-only int8 (biases, q/k norms and the indexer kept) on each architecture: the quantized
    model's next-token choice mostly agrees with the float one (random weights of this size sit on near-ties). (V3.2 with every key
    kept: rounding upstream flips a sparse top-k choice among a random model's near-ties.)"""
    import json
    import shutil

    from gasungbi.infer.load import load_for_inference

    name, path, _ = release
    if name == "deepseek_v32":
        dense = path.parent / "dense"
        if not dense.exists():
            shutil.copytree(path, dense)
            cfg = json.loads((dense / "config.json").read_text())
            (dense / "config.json").write_text(json.dumps({**cfg, "index_topk": 256}))
        path = dense
    ids = torch.tensor([PROMPTS[1] * 4])
    with torch.no_grad():
        ref = load_model(path)(ids)[0]
        q8 = load_for_inference(path, "cpu", quant="int8", report=None)(ids)[0]
    # (a dropped bias or a wrong scale agrees on ~1/400 of the choices, and errs by the logits' size)
    assert (ref.argmax(-1) == q8.argmax(-1)).float().mean() >= 0.75
    assert (ref - q8).abs().mean() < 0.15 * ref.abs().mean()


@pytest.mark.parametrize("precision", ["fp32", "fp8"])
@pytest.mark.parametrize("preset,model_type,overrides", [("v32-tiny", "deepseek_v32", {"num_hidden_layers": 2}),
                                                          ("v4-tiny", "deepseek_v4", {})])
def test_tiny_release_presets_train(code_shards, tmp_path, precision, preset, model_type, overrides):
    """The v32-tiny (sparse attention) and v4-tiny (compressed attention) presets train a few steps,
    also with FP8 GEMMs."""
    from gasungbi.train.trainer import TrainConfig, train

    r = train(TrainConfig(data=str(code_shards), out_dir=str(tmp_path / "run"), model=preset, batch_size=2,
                          seq_len=96, max_steps=3, warmup_steps=1, eval_interval=0, eval_batches=1, progress=False,
                          device="cpu", sample_tokens=2, precision=precision, model_overrides=overrides))
    assert r["step"] == 3 and r["val_loss"] > 0 and r["model"]["model_type"] == model_type

"""LoRA and QLoRA (gasungbi/train/lora.py): the same adapters as PEFT after the same SFT steps, PEFT
and transformers load the saved adapters and the merged model with the same logits, QLoRA on an
int8 base lowers the loss, and resumed runs equal uninterrupted ones (SFT and GRPO)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gasungbi import build_model, get_preset, save_model
from gasungbi.data.conventions import CHAT_TEMPLATE, Conventions
from gasungbi.data.sft import SFTLoader, read_conversations
from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer
from gasungbi.post.grpo import GRPOConfig, grpo
from gasungbi.post.sft import sft
from gasungbi.train import lora
from gasungbi.train.optim import lr_multiplier
from gasungbi.train.trainer import TrainConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4  # logits, max-abs (fp32, as tests/test_hf_parity.py)


def length_reward(task, text):
    """A reward that varies within every group of a random model's completions: their length in characters."""
    return len(text) / 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tokenizer with gasungbi's chat template, conversations, a tiny transformers Qwen2 (R1-Distill-Qwen's
    architecture: q/k/v biases) and a tiny gasungbi ``debug`` model (MLA, MoE, MTP) over it."""
    root = tmp_path_factory.mktemp("lora")
    docs = [f"what is {a} + {b}? <answer>{a + b}</answer> 777" for a in range(30) for b in range(10)]
    tok = train_tokenizer(docs, 300)
    save_tokenizer(tok, root / "tok", chat_template=CHAT_TEMPLATE)
    with open(root / "chats.jsonl", "w") as f:
        for a in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} + 1?"},
                                             {"role": "assistant", "content": f"<answer>{a + 1}</answer>"}]}) + "\n")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(root / "qwen")
    save_tokenizer(tok, root / "qwen", chat_template=CHAT_TEMPLATE)
    debug = get_preset("debug").replace(vocab_size=tok.get_vocab_size(), initializer_range=0.1)
    save_model(build_model(debug, seed=0), root / "debug", tokenizer=root / "tok")
    return root


def _sft_config(root, out, base="qwen", **kw) -> TrainConfig:
    fields = dict(init_from=str(root / base), data=str(root / "chats.jsonl"), out_dir=str(out), batch_size=4,
                  seq_len=64, max_steps=4, warmup_steps=1, eval_interval=0, eval_batches=1, log_interval=1,
                  progress=False, device="cpu", lr=3e-3, sample_tokens=1, lora_rank=4, lora_alpha=8, seed=7)
    return TrainConfig(**{**fields, **kw})


def _peft_sft(tc: TrainConfig, targets: list[str]) -> dict[str, torch.Tensor]:
    """The SFT steps of gasungbi's trainer, written for PEFT on transformers' model: the same initial
    adapters, batches, loss (mean over assistant tokens), schedule, clipping and AdamW."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    start = lora.adapter_state(lora.adapted_model(lora.spec_of(tc), "cpu", tc.seed))
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tc.init_from, dtype=torch.float32)
    model = get_peft_model(hf, LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha, target_modules=targets,
                                          lora_dropout=0.0))
    set_peft_model_state_dict(model, start)
    assert all(torch.equal(v, get_peft_model_state_dict(model)[k]) for k, v in start.items())
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == len(start)
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    loader = SFTLoader(tc.data, Conventions.load(tc.init_from), "train", tc.batch_size, tc.seq_len, seed=tc.seed,
                       conversations=read_conversations(tc.data))
    for step in range(tc.max_steps):
        mult = lr_multiplier((step + 1) / tc.max_steps, tc.warmup_steps / tc.max_steps, tc.schedule,
                             tc.min_lr_ratio, tc.decay_frac)
        for g in opt.param_groups:
            g["lr"] = tc.lr * mult
        x, y = loader.next_batch()
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return get_peft_model_state_dict(model)


def _logits_with_adapters(tc: TrainConfig, adapter_dir, tokens):
    model = lora.adapted_model(lora.spec_of(tc), "cpu", tc.seed)
    lora.load_adapters(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(tokens)


def test_sft_adapters_match_peft_and_load_in_transformers(root, tmp_path):
    tc = _sft_config(root, tmp_path / "run")
    report = sft(tc)
    step = report["checkpoint"]
    config = json.loads((tmp_path / "run" / "step_000004" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(root / "qwen")
    targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["target_modules"] == targets
    ours = load_file(f"{step}/adapter_model.safetensors")
    assert len(ours) == 2 * 7 * 2 and "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in ours
    theirs = _peft_sft(tc, targets)
    assert set(theirs) == set(ours)
    assert all(ours[k].abs().max() > 0 for k in ours if "lora_B" in k)  # the adapters moved
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert diff < 1e-6, diff

    # PEFT loads the adapter directory onto transformers' model: the logits of gasungbi's adapted model
    from peft import PeftModel

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    want = _logits_with_adapters(tc, step, tokens)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(root / "qwen", dtype=torch.float32)
    with torch.no_grad():
        base = hf(tokens).logits
        got = PeftModel.from_pretrained(hf, step).eval()(input_ids=tokens).logits
    assert (got - want).abs().max().item() < TOL
    assert (base - want).abs().max().item() > 100 * TOL  # the adapters change the logits

    # export-hf --merge-lora: transformers loads the merged model with the same logits
    from gasungbi.cli import main

    assert main(["export-hf", "--merge-lora", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(tokens).logits - want).abs().max().item() < TOL
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_qlora_int8_lowers_the_loss_and_resumes_exactly(root, tmp_path):
    tc = dict(base="debug", max_steps=5, lr=1e-2, quant="int8")
    straight = sft(_sft_config(root, tmp_path / "a", **tc))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
            if "lm_loss" in line]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.05, rows
    model = lora.adapted_model(lora.spec_of(_sft_config(root, tmp_path, **tc)), "cpu")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"QLoraLinear", "FrozenQuantLinear", "FrozenQuantExperts"} <= kinds
    floats = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert floats == {"kv_b_proj", "lora_A", "lora_B"}  # kv_b_proj: read as a matrix by the absorbed MLA
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    sft(_sft_config(root, tmp_path / "b", stop_after=2, **tc))
    resumed = sft(_sft_config(root, tmp_path / "b", resume=True, **tc))
    wa = load_file(f"{straight['checkpoint']}/adapter_model.safetensors")
    wb = load_file(f"{resumed['checkpoint']}/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qlora_base_computes_the_dequantized_model(root):
    """The frozen int8 and int4 bases compute the float model of their dequantized weights, and the
    backward of a quantized product is the gradient of the dequantized matrix."""
    from gasungbi.infer.load import read_quantizing
    from gasungbi.model.transformer import from_state_dict

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    for mode in ("int8", "int4"):
        base = lora.load_quantized_base(root / "debug", mode).eval()
        cfg, qsd = read_quantizing(root / "debug", mode)
        floats = {k: lora._dequantize(v, qsd[k + "_scales"], torch.float32) if k + "_scales" in qsd else v
                  for k, v in qsd.items() if not k.endswith("_scales")}
        with torch.no_grad():
            assert (base(tokens) - from_state_dict(cfg, floats)(tokens)).abs().max().item() < TOL
    q = torch.randint(-127, 128, (24, 32), dtype=torch.int8)
    s = torch.rand(24, dtype=torch.float64) / 100
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: lora.frozen_quant_linear(x, q, s), (x,))
    assert torch.allclose(lora.frozen_quant_linear(x, q, s), x @ (q.double() * s[:, None]).t())


def test_grpo_with_lora_and_kl_resumes_exactly(root, tmp_path):
    base = dict(init_from=str(root / "debug"), task="arithmetic", difficulty=2, reward="tests.test_lora:length_reward",
                prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-2, eval_tasks=2, ckpt_interval=2,
                progress=False, seed=1, beta=0.1, lora_rank=4)
    report = grpo(GRPOConfig(out_dir=str(tmp_path / "a"), steps=4, **base))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kl"] > 0  # the reference (adapters off) differs from the trained policy
    grpo(GRPOConfig(out_dir=str(tmp_path / "b"), steps=2, **base))
    resumed = grpo(GRPOConfig(out_dir=str(tmp_path / "b"), steps=4, resume=True, **base))
    wa = load_file(f"{report['checkpoint']}/adapter_model.safetensors")
    wb = load_file(f"{resumed['checkpoint']}/adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_flags_that_do_not_go_together_are_named(root, tmp_path):
    from gasungbi.errors import run_dir_hint

    for kw, words in ((dict(lora_rank=0, quant="int8"), "add lora_rank"),
                      (dict(lora_targets=("kv_b_proj",)), "kv_b_proj"),
                      (dict(optimizer="muon"), "adamw"),
                      (dict(precision="fp8"), "fp8")):
        with pytest.raises(ValueError, match=words):
            _sft_config(root, tmp_path / "x", **kw).validate()
    with pytest.raises(ValueError, match="match no projection"):
        sft(_sft_config(root, tmp_path / "y", lora_targets=("wq_b",)))
    sft(_sft_config(root, tmp_path / "z", max_steps=1))
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        sft(_sft_config(root, tmp_path / "z", max_steps=2, lora_rank=0, resume=True))
    assert "export-hf --merge-lora" in run_dir_hint(tmp_path / "z" / "step_000001")
    assert "export-hf --merge-lora" in run_dir_hint(tmp_path / "z")

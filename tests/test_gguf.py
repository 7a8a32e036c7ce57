"""GGUF export, proven by llama.cpp itself (llama-cpp-python, built from source at install).

llama.cpp runs each exported file with its KV cache in f32 (its f16 default alone moves logits by
~1e-2) and returns teacher-forced logits for every position, compared with ours. Random-weight
models have near-ties (llama.cpp's own converter agrees with transformers on ~97% of top-1
positions there), so they are held to top-1 agreement; a model gasungbi trained has real margins,
and its 32 greedy tokens must be equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gasungbi.presets import get_preset
from gasungbi.data.conventions import CHAT_TEMPLATE
from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer
from gasungbi.infer.generate import generate
from gasungbi.interop.gguf import open_in_llama_cpp
from gasungbi.interop.hf import load_model, save_model
from gasungbi.model.transformer import build_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by the test extra")

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
F32 = 0  # GGML_TYPE_F32, for llama.cpp's KV cache


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (gasungbi's own) trained on English text and code."""
    root = tmp_path_factory.mktemp("tok")
    text = SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.exists() else "the quick brown fox. " * 4000
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], 512)
    save_tokenizer(tok, root, chat_template=CHAT_TEMPLATE)
    return root


def _llama(path: Path, n_ctx: int = 256):
    return open_in_llama_cpp(path, n_ctx=n_ctx, logits_all=True, type_k=F32, type_v=F32, n_threads=2,
                             n_batch=n_ctx, verbose=False)[0]


def llama_logits(path: Path, tokens: list[int]) -> torch.Tensor:
    """llama.cpp's teacher-forced logits [T, V] for ``tokens``."""
    llm = _llama(path)
    try:
        llm.reset()
        llm.eval(tokens)
        return torch.tensor(llm.scores[: len(tokens)], dtype=torch.float32)
    finally:
        llm.close()


def llama_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's ``n`` greedy tokens after ``prompt``."""
    llm = _llama(path)
    try:
        out = []
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            out.append(tok)
            if len(out) == n:
                return out
    finally:
        llm.close()


def our_logits(ckpt: Path, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return load_model(ckpt)(torch.tensor([tokens]))[0].float()


def export(ckpt: Path, out: Path, dtype: str = "f32") -> Path:
    r = subprocess.run([sys.executable, "-m", "gasungbi", "export", str(ckpt), "--out", str(out), "--dtype", dtype],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def _tokens(vocab: int, n: int = 96, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(11, vocab, (n,), generator=g).tolist()  # ids 0..10 are control tokens


def _transformers_checkpoint(path: Path, tok_dir: Path, config) -> Path:  # noqa: D103
    """A checkpoint written by transformers (not gasungbi) with random weights and our tokenizer."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases (Qwen2) and per-head q/k norms (Qwen3) that matter
        for name, p in model.named_parameters():
            if name.endswith((".bias", "q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    for f in tok_dir.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tok_dir):
    """``cpu-tiny`` trained briefly by gasungbi on tiny Shakespeare (real logit margins)."""
    from gasungbi.data.tokenizer import load_tokenizer
    from gasungbi.train.objective import Objective

    tok = load_tokenizer(tok_dir)
    text = SHAKESPEARE.read_text()[:300_000] if SHAKESPEARE.exists() else "the quick brown fox. " * 10000
    data = torch.tensor(tok.encode(text).ids)
    cfg = get_preset("cpu-tiny").replace(vocab_size=tok.get_vocab_size(), max_position_embeddings=512)
    torch.manual_seed(0)
    model = build_model(cfg, seed=0).train()
    objective = Objective(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, data.numel() - 129, (8,), generator=g)
        batch = torch.stack([data[s:s + 129] for s in starts])
        loss = objective(batch[:, :-1], batch[:, 1:])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained") / "ckpt"
    save_model(model.eval(), path, tokenizer=tok_dir)
    return path


def test_trained_checkpoint_greedy_tokens_equal_llama_cpp(trained, tmp_path):
    from gasungbi.data.tokenizer import load_tokenizer

    gguf = export(trained, tmp_path / "tiny.gguf")
    prompt = load_tokenizer(trained).encode("ROMEO:\nWhat light through yonder window").ids
    ours = generate(load_model(trained), [prompt], max_new_tokens=32, stop_tokens=())[0].tokens
    assert llama_greedy(gguf, prompt, 32) == ours
    # the Modelfile beside it: the GGUF, gasungbi's chat template, its stop tokens
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf") and 'PARAMETER stop "<|end|>"' in modelfile
    assert "<|assistant|>" in modelfile


def test_trained_checkpoint_logits_and_tokenizer_in_llama_cpp(trained, tmp_path):
    from gasungbi.data.tokenizer import load_tokenizer

    gguf = export(trained, tmp_path / "tiny.gguf")
    tok = load_tokenizer(trained)
    text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n안녕 🤖 <|user|> Act 2, scene 10: 3.14 x 2026=6361.64"
    llm = _llama(gguf)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text).ids
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true"  # gasungbi's rule: <|bos|> before text
    llm.close()
    tokens = tok.encode(SHAKESPEARE.read_text()[-2000:] if SHAKESPEARE.exists() else text * 4).ids[:128]
    a, b = our_logits(trained, tokens), llama_logits(gguf, tokens)
    assert agreement(a, b) >= 0.99
    assert (a - b).abs().max().item() < 1e-2 * a.abs().max().item()
    q8 = llama_logits(export(trained, tmp_path / "tiny-q8.gguf", "q8_0"), tokens)
    assert agreement(a, q8) >= 0.9


KINDS = ["v3", "v2", "llama"]  # also compared with llama.cpp's own converter (its Qwen path wants Qwen's tokenizer)
EXPORTED = KINDS + ["qwen2", "qwen3", "v32"]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, tok_dir):
    """kind -> a checkpoint written by transformers: DeepseekV3 (q_lora, YaRN, group-limited sigmoid
    routing with a non-zero correction bias), DeepseekV2 (softmax routing, no q_lora), Llama (GQA),
    Qwen2 (q/k/v biases), Qwen3 (per-head q/k norm, head_dim x heads != hidden) and DeepseekV32 (V3
    with the lightning indexer's top-k)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    mla = dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
               n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, qk_rope_head_dim=8,
               qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)
    configs = {
        "v3": transformers.DeepseekV3Config(
            **common, **mla, n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=32,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
        "v2": transformers.DeepseekV2Config(**common, **mla, q_lora_rank=None, topk_method="greedy",
                                            norm_topk_prob=False),
        "llama": transformers.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen2": transformers.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen3": transformers.Qwen3Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=32),
        # llama.cpp's indexer takes index_head_dim 64 (its Hadamard transform); each query sees 32 of up to 96 keys
        "v32": transformers.DeepseekV32Config(**common, **mla, n_group=4, topk_group=2, q_lora_rank=32,
                                              index_n_heads=16, index_head_dim=64, index_topk=32),
    }
    root, out = tmp_path_factory.mktemp("foreign"), {}
    for kind, config in configs.items():
        ckpt = _transformers_checkpoint(root / kind, tok_dir, config)
        # the keys DeepSeek's released config.json carries and transformers does not write
        extra = {"v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}, "v2": {"scoring_func": "softmax"},
                 "v32": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}}
        if kind in extra:
            cfg = json.loads((ckpt / "config.json").read_text())
            (ckpt / "config.json").write_text(json.dumps({**cfg, **extra[kind]}, indent=2))
        if kind in ("v3", "v32"):  # a non-zero correction bias, so that llama.cpp must apply it to choose experts
            from safetensors.torch import load_file, save_file
            sd = load_file(ckpt / "model.safetensors")
            for k in [k for k in sd if k.endswith("e_score_correction_bias")]:
                sd[k] = torch.randn(sd[k].shape, generator=torch.Generator().manual_seed(1)) * 0.1
            save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
        out[kind] = ckpt
    return out


@pytest.mark.parametrize("kind", EXPORTED)
def test_transformers_checkpoints_run_in_llama_cpp(kind, foreign, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt, tokens = foreign[kind], _tokens(512)
    ours = our_logits(ckpt, tokens)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(torch.tensor([tokens])).logits[0]
    assert (ours - hf).abs().max().item() < 1e-4  # the export starts from a faithful model
    theirs = llama_logits(export(ckpt, tmp_path / f"{kind}.gguf"), tokens)
    assert agreement(ours, theirs) >= 0.95, (kind, agreement(ours, theirs))
    # q8_0 decodes (random weights sit on near-ties, so its agreement is the trained model's test)
    assert len(llama_greedy(export(ckpt, tmp_path / f"{kind}-q8.gguf", "q8_0"), tokens[:16], 8)) == 8


@pytest.fixture(scope="module")
def llama_cpp_converter(tmp_path_factory):
    """llama.cpp's own ``convert_hf_to_gguf.py`` (with its gguf-py), from the source distribution of
    the installed llama-cpp-python (pip's cache holds it: the install built from it)."""
    import importlib.metadata
    import tarfile

    version = importlib.metadata.version("llama-cpp-python")
    root = tmp_path_factory.mktemp("llama.cpp")
    r = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(root), "-q"], capture_output=True, text=True, timeout=600)
    archives = list(root.glob("*.tar.gz"))
    if r.returncode or not archives:
        pytest.skip(f"the llama-cpp-python {version} source distribution is not available: {r.stderr[-300:]}")
    with tarfile.open(archives[0]) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        keep = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/",
                                                                              prefix + "gguf-py/")))]
        tar.extractall(root, members=keep, filter="data")
    return root / prefix


def convert_with_llama_cpp(converter: Path, ckpt: Path, out: Path) -> Path:
    """Run llama.cpp's converter (its pre-tokenizer check, which knows only published tokenizers by
    hash, is told that ours is GPT-2's byte-level split, as it is)."""
    code = ("import runpy, sys\n"
            f"sys.path[:0] = [{str(converter / 'gguf-py')!r}, {str(converter)!r}]\n"
            "import conversion.base as base\n"
            "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
            f"sys.argv = ['convert_hf_to_gguf.py', {str(ckpt)!r}, '--outfile', {str(out)!r}, '--outtype', 'f32']\n"
            f"runpy.run_path({str(converter / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_as_close_as_llama_cpps_own_converter(kind, foreign, llama_cpp_converter, tmp_path):
    ckpt, tokens = foreign[kind], _tokens(512, seed=1)
    ours = our_logits(ckpt, tokens)
    mine = llama_logits(export(ckpt, tmp_path / "ours.gguf"), tokens)
    ref_file = convert_with_llama_cpp(llama_cpp_converter, ckpt, tmp_path / "ref.gguf")
    try:
        ref = llama_logits(ref_file, tokens)
    except ValueError:  # llama.cpp cannot load it: a V2 without q_lora outside 26/27 layers lacks q_lora_rank
        assert kind == "v2"
        return
    assert agreement(ours, mine) >= agreement(ours, ref), (kind, agreement(ours, mine), agreement(ours, ref))
    assert (ours - mine).abs().max() <= (ours - ref).abs().max() + 1e-4


def test_export_errors_are_one_line(tmp_path, tok_dir):
    ckpt = tmp_path / "no-tok"
    save_model(build_model(get_preset("debug"), seed=0), ckpt)
    r = subprocess.run([sys.executable, "-m", "gasungbi", "export", str(ckpt), "--out", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()
    bad = json.loads((tok_dir / "tokenizer.json").read_text())
    bad["pre_tokenizer"] = {"type": "Whitespace"}
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    (ckpt / "tokenizer.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "gasungbi", "export", str(ckpt), "--out", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pre-tokenizer" in r.stderr


def test_deepseek_v4_runs_in_llama_cpp(tok_dir, tmp_path):
    """DeepSeek-V4 as llama.cpp's deepseek4, on a configuration its graph takes (4 streams, compression
    rates 4 and 128, index_head_dim 64, hash layers first): 200 tokens, so that the HCA layer has an
    entry and CSA's indexer keeps 16 of up to 50; every constant transformers initializes randomized."""
    pytest.importorskip("transformers")
    from conftest import v4_reference

    hf = v4_reference(vocab_size=512, sliding_window=16, index_topk=16,
                      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128})
    ckpt = tmp_path / "v4"
    hf.save_pretrained(ckpt)
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    tokens = _tokens(512, n=200)
    ours = our_logits(ckpt, tokens)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens]), use_cache=False).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
    theirs = llama_logits(export(ckpt, tmp_path / "v4.gguf"), tokens)
    assert agreement(ours, theirs) >= 0.95, agreement(ours, theirs)
    assert len(llama_greedy(export(ckpt, tmp_path / "v4-q8.gguf", "q8_0"), tokens[:16], 8)) == 8


def test_deepseek_v4_llama_cpp_cannot_run_is_refused(tok_dir, tmp_path):
    """Compression rates llama.cpp's deepseek4 does not take: a one-line refusal before any file is written."""
    pytest.importorskip("transformers")
    from conftest import v4_reference

    ckpt = tmp_path / "v4"
    v4_reference(vocab_size=512).save_pretrained(ckpt)  # rates 2 and 4
    for f in tok_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "gasungbi", "export", str(ckpt), "--out", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "compression rates 4 (CSA) and 128 (HCA)" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.gguf").exists()

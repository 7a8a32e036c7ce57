"""One-line errors, never a traceback (issue 11 §4): a user's bad config.json, tokenizer.json, corpus,
JSONL line or flag exits 2 with one line naming the file, field or flag; NaN/Inf weights warn on load.
Foreign checkpoints are written by transformers (a tiny DeepseekV3, save_pretrained)."""

import json
import shutil

import pytest
import torch

from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    """A tiny DeepseekV3 saved by transformers, with a gasungbi tokenizer beside it."""
    out = tmp_path_factory.mktemp("hf") / "ckpt"
    cfg = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, max_position_embeddings=128, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1)
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(out)
    save_tokenizer(train_tokenizer(["hello world, def f(x): return x"] * 20, 300), out)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(ckpt, edit):
    f = ckpt / "config.json"
    if callable(edit):
        d = json.loads(f.read_text())
        edit(d)
        f.write_text(json.dumps(d))
    else:
        f.write_text(edit)


CONFIGS = {  # case -> (edit of config.json, what the error must name)
    "wrong type": (lambda d: d.update(hidden_size="abc"), "hidden_size"),
    "rope_scaling a string": (lambda d: d.update(rope_scaling="yes"), "rope_scaling"),
    "a JSON list": ("[1, 2, 3]", "list"),
    "not JSON": ("not json {", "invalid JSON"),
    "no hidden_size": (lambda d: d.pop("hidden_size"), "hidden_size"),
    "no num_hidden_layers": (lambda d: d.pop("num_hidden_layers"), "num_hidden_layers"),
}


def test_bad_config_json_is_one_line_naming_file_and_field(hf_ckpt, tmp_path, cli, one_line_error):
    for i, (case, (edit, needle)) in enumerate(CONFIGS.items()):
        ckpt = _copy(hf_ckpt, tmp_path / f"c{i}")
        _edit_config(ckpt, edit)
        err = one_line_error(cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "2"), "generate")
        assert str(ckpt / "config.json") in err and needle in err, (case, err)


def test_bad_tokenizer_json_is_one_line_naming_the_file(hf_ckpt, tmp_path, cli, one_line_error):
    for i, content in enumerate([b"\x00garbage{", b"", b"{}"]):
        ckpt = _copy(hf_ckpt, tmp_path / f"t{i}")
        (ckpt / "tokenizer.json").write_bytes(content)
        args = ("serve", ckpt, "--port", "0") if i == 0 else ("generate", ckpt, "--prompt", "hi")
        err = one_line_error(cli(*args), args[0])
        assert str(ckpt / "tokenizer.json") in err, err
    # serve has no --prompt-ids flag, so it must not suggest one
    ckpt = _copy(hf_ckpt, tmp_path / "no_tokenizer")
    (ckpt / "tokenizer.json").unlink()
    err = one_line_error(cli("serve", ckpt, "--port", "0"), "serve")
    assert "tokenizer.json" in err and "--prompt-ids" not in err


def test_prepare_names_what_is_wrong_with_the_corpus(tmp_path, cli, one_line_error):
    (tmp_path / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café olé\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": \n')
    (tmp_path / "ok.txt").write_text("hello world\n" * 50)
    cases = {"missing.txt": "does not exist", "binary.dat": "binary", "empty.txt": "empty",
             "latin1.txt": "not UTF-8", "bad.jsonl": "bad.jsonl:3"}
    for name, needle in cases.items():
        err = one_line_error(cli("prepare", "--corpus", tmp_path / name, "--out", tmp_path / "out",
                                      "--vocab-size", "300"), "prepare")
        assert name in err and needle in err, err
    for v in ("0", "10"):
        err = one_line_error(cli("prepare", "--corpus", tmp_path / "ok.txt", "--out", tmp_path / "out",
                                      "--vocab-size", v), "prepare")
        assert f"--vocab-size {v}" in err, err


def test_bad_sft_jsonl_line_names_file_and_line(hf_ckpt, tmp_path, cli, one_line_error):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"messages": [\n')
    err = one_line_error(cli("sft", "--init-from", hf_ckpt, "--data", data, "--out-dir", tmp_path / "run",
                                  "--max-steps", "1"), "sft")
    assert f"{data}:3" in err, err


def test_non_finite_weights_warn_on_load(hf_ckpt, tmp_path, cli):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(hf_ckpt, tmp_path / "nan")
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    sd["model.layers.1.mlp.shared_experts.down_proj.weight"][0, 0] = float("inf")
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    r = cli("generate", ckpt, "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr
    assert "NaN or Inf" in r.stderr and "model.norm.weight" in r.stderr and str(ckpt) in r.stderr
    clean = cli("generate", hf_ckpt, "--prompt", "hi", "--max-new-tokens", "1")
    assert clean.returncode == 0 and "NaN" not in clean.stderr


def test_a_run_directory_or_its_latest_pointer_names_the_checkpoint(hf_ckpt, tmp_path, cli, one_line_error):
    """Passing RUN or RUN/latest where a checkpoint goes (an easy slip) names RUN/step_N to pass."""
    run = tmp_path / "run"
    _copy(hf_ckpt, run / "step_000002")
    (run / "latest").write_text("step_000002\n")
    (run / "config.json").write_text(json.dumps({"train": {"out_dir": str(run)}}))  # the run's settings
    for path, what in ((run, "is a run directory"), (run / "latest", "is the run's pointer file")):
        for args in (("generate", path, "--prompt", "hi"), ("grpo", "--init-from", path, "--out-dir", tmp_path / "g"),
                     ("sft", "--init-from", path, "--data", tmp_path / "x.jsonl", "--out-dir", tmp_path / "s"),
                     ("quantize", path, "--mode", "int8", "--out", tmp_path / "q")):
            err = one_line_error(cli(*args), args[0])
            assert f"{path} {what}, not a checkpoint" in err and str(run / "step_000002") in err, err
    assert not (tmp_path / "g").exists() and not (tmp_path / "s").exists()
    # a checkpoint that holds a `latest` file of its own (HF Trainer + DeepSpeed writes one) still loads
    deepspeed = _copy(hf_ckpt, tmp_path / "checkpoint-1")
    (deepspeed / "latest").write_text("global_step1")
    (deepspeed / "global_step1").mkdir()
    r = cli("generate", deepspeed, "--prompt", "hi", "--max-new-tokens", "1")
    assert r.returncode == 0, r.stderr

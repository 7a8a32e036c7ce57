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


# --- nothing lost, no way in: every refusal is one line, exit 2, and changes nothing on disk --------------------


def snapshot(*paths) -> dict:
    """Every file under ``paths``: its bytes and mtime, to compare before and after a refused command."""
    out = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def refused(cli, one_line_error, *args, needles=(), unchanged=()) -> str:
    """Run ``args``: one error line (exit 2, no traceback) holding every needle; ``unchanged`` as before."""
    before = snapshot(*unchanged)
    err = one_line_error(cli(*args), str(args[0]))
    assert all(str(n) in err for n in needles), (args, err)
    assert snapshot(*unchanged) == before, args
    return err


@pytest.fixture(scope="module")
def shards(tmp_path_factory, hf_ckpt):
    """Token shards of a small corpus, with the tokenizer of ``hf_ckpt`` beside them."""
    from gasungbi.data.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("shards")
    (root / "c.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(4000)))
    prepare_corpus(str(root / "c.txt"), root / "shards", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory, cli):
    """A two-step pretraining run of the debug preset, checkpointed at step 2."""
    out = tmp_path_factory.mktemp("run") / "R"
    r = cli("train", "--data", shards, "--out-dir", out, "--model", "debug", "--batch-size", "2", "--seq-len", "16",
            "--max-steps", "2", "--eval-batches", "1", "--sample-tokens", "2", "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out


def chats(path):
    msg = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"}]}
    path.write_text((json.dumps(msg) + "\n") * 8)
    return path


def test_quantize_never_writes_over_its_checkpoint(hf_ckpt, tmp_path, cli, one_line_error):
    ckpt = _copy(hf_ckpt, tmp_path / "C")
    for mode in ("int8", "int4", "fp8"):
        for extra in ((), ("--overwrite",)):
            refused(cli, one_line_error, "quantize", ckpt, "--mode", mode, "--out", ckpt, *extra,
                    needles=(f"--out {ckpt} is the input",), unchanged=[ckpt])
    refused(cli, one_line_error, "quantize", ckpt, "--mode", "int8", "--out", tmp_path, "--overwrite",
            needles=("holds the input",), unchanged=[tmp_path])
    other = _copy(hf_ckpt, tmp_path / "O")
    refused(cli, one_line_error, "quantize", ckpt, "--mode", "int8", "--out", other,
            needles=(other, "--overwrite", "config.json"), unchanged=[tmp_path])
    (tmp_path / "f").write_text("mine")
    refused(cli, one_line_error, "quantize", ckpt, "--mode", "int8", "--out", tmp_path / "f", "--overwrite",
            needles=(tmp_path / "f", "is a file"), unchanged=[tmp_path])
    refused(cli, one_line_error, "quantize", ckpt, "--mode", "int4", "--group-size", "0", "--out", tmp_path / "q",
            needles=("--group-size 0",), unchanged=[tmp_path])
    assert not (tmp_path / "q").exists()
    # --overwrite replaces another directory as a whole
    (other / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    r = cli("quantize", ckpt, "--mode", "int8", "--out", other, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((other / "config.json").read_text())["quantization_config"]["mode"] == "int8"
    assert not (other / "model-00001-of-00002.safetensors").exists()


def test_a_run_never_writes_into_a_checkpoint(hf_ckpt, shards, tmp_path, cli, one_line_error):
    v = _copy(hf_ckpt, tmp_path / "V")
    data = chats(tmp_path / "chats.jsonl")
    sft = ("sft", "--data", data, "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
           "--sample-tokens", "2", "--no-progress", "--device", "cpu")
    train = ("train", "--data", shards, "--max-steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches",
             "1", "--sample-tokens", "2", "--no-progress", "--device", "cpu")
    for args in (sft, train):
        for extra in ((), ("--overwrite",), ("--resume",)):
            refused(cli, one_line_error, *args, "--init-from", v, "--out-dir", v, *extra,
                    needles=(v, "starts from"), unchanged=[v])
        # a checkpoint the run does not start from is not a run directory either
        refused(cli, one_line_error, *args, "--init-from", hf_ckpt, "--out-dir", v,
                needles=(v, "holds a model checkpoint", "--overwrite"), unchanged=[v])
    refused(cli, one_line_error, "grpo", "--init-from", v, "--out-dir", v, needles=(v, "starts from"), unchanged=[v])
    (tmp_path / "file").write_text("mine")
    refused(cli, one_line_error, *sft, "--init-from", hf_ckpt, "--out-dir", tmp_path / "file",
            needles=(tmp_path / "file", "is a file"), unchanged=[tmp_path / "file"])
    # --overwrite replaces the checkpoint with the run
    r = cli(*sft, "--init-from", hf_ckpt, "--out-dir", v, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (v / "step_000001" / "model.safetensors").exists() and not list(v.glob("*.safetensors"))


def test_resume_reads_only_its_own_run(run, shards, cli, one_line_error):
    import pickle
    import subprocess

    args = ("train", "--data", shards, "--out-dir", run, "--resume")
    state = run / "step_000002" / "training_state.pt"
    good = state.read_bytes()
    latest = (run / "latest").read_text()
    other = _copy(run, run.parent / "other")
    (run / "latest").write_text("../other/step_000002\n")
    refused(cli, one_line_error, *args, needles=(run / "latest", "../other/step_000002"), unchanged=[run, other])
    (run / "latest").write_text(latest)
    for content in (b"\x00garbage", b"", pickle.dumps(subprocess.Popen), pickle.dumps([1, 2])):
        state.write_bytes(content)
        refused(cli, one_line_error, *args, needles=(state,), unchanged=[run])
    state.write_bytes(good)


def test_export_hf_refuses_an_existing_output(run, hf_ckpt, tmp_path, cli, one_line_error):
    (tmp_path / "f").write_text("mine")
    refused(cli, one_line_error, "export-hf", run, tmp_path / "f", needles=(tmp_path / "f", "is a file"),
            unchanged=[tmp_path])
    refused(cli, one_line_error, "export-hf", run, run, "--overwrite", needles=("is the input",), unchanged=[run])
    other = _copy(hf_ckpt, tmp_path / "O")
    refused(cli, one_line_error, "export-hf", run, other, needles=(other, "--overwrite"), unchanged=[other])
    (other / "stale.txt").write_text("from before")
    assert cli("export-hf", run, other, "--overwrite").returncode == 0
    assert (other / "model.safetensors").exists() and not (other / "stale.txt").exists()


def test_export_refuses_existing_outputs_and_a_bad_tokenizer(hf_ckpt, tmp_path, cli, one_line_error):
    refused(cli, one_line_error, "export", hf_ckpt, "--out", tmp_path, needles=(tmp_path, "is a directory"),
            unchanged=[tmp_path])
    (tmp_path / "m.gguf").write_bytes(b"GGUF mine")
    refused(cli, one_line_error, "export", hf_ckpt, "--out", tmp_path / "m.gguf",
            needles=(tmp_path / "m.gguf", "--overwrite"), unchanged=[tmp_path])
    (tmp_path / "m.gguf").unlink()
    (tmp_path / "Modelfile").write_text("FROM ./m.gguf\n")
    refused(cli, one_line_error, "export", hf_ckpt, "--out", tmp_path / "m.gguf",
            needles=(tmp_path / "Modelfile", "--overwrite"), unchanged=[tmp_path])
    ckpt = _copy(hf_ckpt, tmp_path / "C")
    refused(cli, one_line_error, "export", ckpt, "--out", ckpt / "model.safetensors", "--overwrite",
            needles=("is a file of the checkpoint",), unchanged=[ckpt])
    for content in (b"\x00garbage{", b"[1, 2]", b'{"model": {"type": "BPE", "vocab": 3}}'):
        (ckpt / "tokenizer.json").write_bytes(content)
        refused(cli, one_line_error, "export", ckpt, "--out", tmp_path / "x.gguf", needles=(ckpt / "tokenizer.json",),
                unchanged=[tmp_path])
    assert not (tmp_path / "x.gguf").exists()


def test_modelfile_of_another_gguf_is_kept(tmp_path):
    from gasungbi.interop.gguf import modelfile_path

    assert modelfile_path(tmp_path / "a.gguf") == tmp_path / "Modelfile"
    (tmp_path / "Modelfile").write_text("FROM ./a.gguf\n")
    assert modelfile_path(tmp_path / "a.gguf") == tmp_path / "Modelfile"
    assert modelfile_path(tmp_path / "b.gguf") == tmp_path / "b.Modelfile"


def test_prepare_refuses_to_replace_a_data_directory(tmp_path, cli, one_line_error):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, def f(x): return x\n" * 200)
    base = ("prepare", "--corpus", corpus, "--vocab-size", "300")
    (tmp_path / "f").write_text("mine")
    refused(cli, one_line_error, *base, "--out", tmp_path / "f", needles=(tmp_path / "f", "is a file"),
            unchanged=[tmp_path])
    assert cli(*base, "--out", tmp_path / "d").returncode == 0
    refused(cli, one_line_error, *base, "--out", tmp_path / "d", needles=(tmp_path / "d", "manifest.json", "--overwrite"),
            unchanged=[tmp_path])
    assert cli(*base, "--out", tmp_path / "d", "--overwrite").returncode == 0


def test_training_flags_and_config_files_are_checked(tmp_path, cli, one_line_error):
    (tmp_path / "c.json").write_text('{"lr": "abc"}')
    base = ("train", "--data", tmp_path / "none", "--out-dir", tmp_path / "r")
    refused(cli, one_line_error, *base, "--config", tmp_path / "c.json", needles=("c.json", "lr", "'abc'"))
    refused(cli, one_line_error, *base, "--set", "nope=1", needles=("nope",))
    refused(cli, one_line_error, *base, "--model", "nope", needles=("'nope'", "debug"))
    assert not (tmp_path / "r").exists()


def test_bad_numbers_of_eval_gym_and_serve(hf_ckpt, cli, one_line_error):
    refused(cli, one_line_error, "eval-gym", hf_ckpt, "--k", "0", needles=("--k",))
    for args in (("--port", "-1"), ("--port", "70000"), ("--threads", "-1")):
        refused(cli, one_line_error, "serve", hf_ckpt, *args, needles=(args[0],))


def test_distill_checks_the_student_before_sampling(hf_ckpt, tmp_path, cli, one_line_error):
    import time

    t = time.monotonic()
    refused(cli, one_line_error, "distill", "--teacher", hf_ckpt, "--student", tmp_path / "missing", "--out-dir",
            tmp_path / "d", "--prompts", "50", needles=(tmp_path / "missing",))
    assert time.monotonic() - t < 60 and not (tmp_path / "d").exists()


def test_errors_name_the_real_problem(hf_ckpt, tmp_path, cli, one_line_error):
    missing = tmp_path / "missing"
    refused(cli, one_line_error, "generate", missing, "--prompt", "hi", needles=(missing, "does not exist"))
    refused(cli, one_line_error, "eval", missing, "--tasks", "nope", needles=(missing, "does not exist"))
    ckpt = _copy(hf_ckpt, tmp_path / "C")
    (ckpt / "generation_config.json").write_text('{"eos_token_id": "two"}')
    refused(cli, one_line_error, "generate", ckpt, "--prompt", "hi",
            needles=(ckpt / "generation_config.json", "eos_token_id"))


def test_checkpoint_paths_stay_inside_the_checkpoint(hf_ckpt, tmp_path, cli, one_line_error):
    from safetensors import safe_open

    ckpt = _copy(hf_ckpt, tmp_path / "C")
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (ckpt / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../outside.safetensors" for k in keys}}))
    refused(cli, one_line_error, "generate", ckpt, "--prompt", "hi", needles=("../outside.safetensors",))


@pytest.mark.parametrize("tag", ["{% include 'x.jinja' %}", "{% import 'x.jinja' as x %}",
                                 "{% from 'x.jinja' import y %}", "{% extends 'x.jinja' %}"])
def test_server_refuses_a_chat_template_that_reads_files(hf_ckpt, tmp_path, tag, cli, one_line_error):
    ckpt = _copy(hf_ckpt, tmp_path / "C")
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}" + tag)
    refused(cli, one_line_error, "serve", ckpt, "--port", "0", needles=(ckpt, tag.split()[1]))

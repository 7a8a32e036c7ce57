"""Loading what barely fits: the memory check before loading, streaming quantization, and the
checkpoint writer of benchmarks/full_size.py on a tiny shape."""

from __future__ import annotations

import torch

import gasungbi
from gasungbi.config import read_config
from gasungbi.infer.memory import AVAILABLE_ENV, needed_bytes
from gasungbi.infer.placement import plan_placement


def _need(path, quant) -> int:
    cfg = read_config(path)
    plan = plan_placement(cfg, "cpu", None, torch.float32, quant, 128)
    return needed_bytes(plan, min(4096, cfg.max_position_embeddings))["cpu"]


def test_a_model_that_does_not_fit_is_refused_in_one_line(checkpoint, cli, one_line_error, monkeypatch):
    """Float32 needs more than is available, int8 fits: one line naming both figures and int8, exit 2;
    the same figure with --quant int8 loads and generates."""
    float_need, int8_need = _need(checkpoint, None), _need(checkpoint, "int8")
    have = (float_need + int8_need) // 2
    monkeypatch.setenv(AVAILABLE_ENV, str(have))
    for command in ("generate", "chat"):
        args = ("--prompt", "hello", "--max-new-tokens", "2") if command == "generate" else ()
        r = cli(command, checkpoint, *args)
        line = one_line_error(r, command)
        assert f"{float_need:,} bytes" in line and f"{have:,} bytes" in line, line
        assert "--quant int8 would fit" in line and AVAILABLE_ENV in line, line
        assert not r.stdout
    r = cli("generate", checkpoint, "--quant", "int8", "--prompt", "hello", "--max-new-tokens", "2")
    assert r.returncode == 0 and r.stdout, r.stderr
    monkeypatch.setenv(AVAILABLE_ENV, str(_need(checkpoint, "int4") - 1))
    line = one_line_error(cli("generate", checkpoint, "--prompt", "hi", "--max-new-tokens", "1"), "generate")
    assert "no precision fits" in line, line


def test_a_fitting_model_is_not_refused(checkpoint, cli, monkeypatch):
    monkeypatch.setenv(AVAILABLE_ENV, str(_need(checkpoint, None)))
    r = cli("generate", checkpoint, "--prompt", "hello", "--max-new-tokens", "2")
    assert r.returncode == 0 and r.stdout, r.stderr
    monkeypatch.delenv(AVAILABLE_ENV)
    from gasungbi.infer.memory import available_bytes
    have, source = available_bytes("cpu")
    assert have is not None and have > 0 and source in ("MemAvailable", "cgroup limit")


def test_quantize_streams_and_equals_the_in_memory_path(tmp_path, cli):
    """`gasungbi quantize` (one tensor at a time from the files) writes the portable state dict that
    quantizing the whole float model gives, tensor for tensor, for a float checkpoint with MTP and
    routed experts stored one by one; the result loads and generates with the original gone."""
    import shutil

    from gasungbi.infer.quant import quantize_state_dict
    from gasungbi.interop.quantized import read_quantized

    cfg = gasungbi.get_preset("debug").replace(first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = gasungbi.build_model(cfg, seed=0).eval()
    src = tmp_path / "float"
    gasungbi.save_model(model, src, max_shard_bytes=200_000)  # several shards: experts cross files
    assert len(list(src.glob("*.safetensors"))) > 1
    for mode in ("int8", "int4"):
        r = cli("quantize", src, "--mode", mode, "--out", tmp_path / mode, "--group-size", "32")
        assert r.returncode == 0, r.stderr
        _, got = read_quantized(tmp_path / mode)
        want = quantize_state_dict(model, mode, 32)
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    shutil.rmtree(src)
    r = cli("generate", tmp_path / "int4", "--prompt-ids", "3,4,5", "--max-new-tokens", "3")
    assert r.returncode == 0 and r.stdout, r.stderr


def test_safetensors_read_and_write_one_tensor_at_a_time(tmp_path):
    """write_safetensors writes what safetensors reads; read_safetensors reads what it writes, every dtype."""
    from safetensors.torch import load_file

    from gasungbi.interop.hf import read_safetensors, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randint(-9, 9, (7,), dtype=torch.int8),
               "c": torch.randn(2, 2, 2, generator=g), "d": torch.zeros(0), "e": torch.tensor([True, False])}
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, tensors.__getitem__,
                      metadata={"format": "pt"})
    for got in (load_file(str(f)), dict(read_safetensors(f))):
        assert set(got) == set(tensors)
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def _benchmark():
    import importlib.util
    from pathlib import Path

    f = Path(__file__).resolve().parents[1] / "benchmarks" / "full_size.py"
    spec = importlib.util.spec_from_file_location("full_size_benchmark", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_SHAPES = {  # the two full-size shapes of benchmarks/full_size.py, shrunk
    "deepseek-v2-lite": dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                             num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                             max_position_embeddings=256, rope_scaling=None, num_nextn_predict_layers=0,
                             bos_token_id=0, eos_token_id=1),
    "r1-distill-qwen-7b": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=256, bos_token_id=0, eos_token_id=1),
}


def test_the_benchmarks_random_checkpoint_loads_in_transformers_and_gasungbi(tmp_path):
    """benchmarks/full_size.py's checkpoint writer (random bf16, sharded, one tensor at a time), on
    tiny versions of its two shapes: transformers loads every tensor (none missing or unexpected)
    and gives the logits gasungbi gives on the same files."""
    import transformers

    bench = _benchmark()
    for name, shape in TINY_SHAPES.items():
        cfg = gasungbi.get_preset(name).replace(**shape)
        path = bench.write_random_checkpoint(cfg, tmp_path / name, shard_bytes=40_000, seed=0, std=0.3)
        assert len(list(path.glob("*.safetensors"))) > 1
        # larger weights than the benchmark's, so the comparison sees every layer
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                     output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
        ours = gasungbi.load_model(path, dtype=torch.float32)
        ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = hf(ids).logits, ours(ids)
        assert want.std() > 0.1, want.std()  # every layer moves the logits
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-3)


def test_a_large_matrix_is_quantized_a_block_of_rows_at_a_time(monkeypatch):
    """Quantizing by blocks of rows (the float32 temporaries of a whole output head would be
    gigabytes) gives the values and scales of quantizing the matrix at once, int4's int8 fallback
    included."""
    from gasungbi.infer import quant

    g = torch.Generator().manual_seed(0)
    for n, mode in ((208, "int4"), (200, "int4"), (200, "int8")):  # 200 rows: int4 falls back to int8
        w = torch.randn(n, 128, generator=g).bfloat16()
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 10**12)
        want = quant.quantize_weight(w, mode, 64)
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 48 * 128)
        got = quant.quantize_weight(w, mode, 64)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (n, mode)

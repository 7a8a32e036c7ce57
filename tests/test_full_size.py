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

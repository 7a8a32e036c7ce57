"""Pretraining: exact resume, clean interruption, MoE balancing, optimizers, schedules, CLI."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gasungbi.data.prepare import prepare_corpus
from gasungbi.train.optim import lr_multiplier, newton_schulz
from gasungbi.train.trainer import TrainConfig, train

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def _corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text()[:200_000]
    return "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(4000))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "corpus.txt"
    src.write_text(_corpus_text())
    prepare_corpus(str(src), root / "shards", vocab_size=400, val_fraction=0.1, progress=False)
    return root / "shards"


def _cfg(data_dir, out, **kw):
    base = dict(data=str(data_dir), out_dir=str(out), model="debug", batch_size=4, seq_len=32, max_steps=6,
                warmup_steps=2, eval_interval=3, eval_batches=2, ckpt_interval=0, log_interval=1,
                progress=False, sample_tokens=4, device="cpu", price_per_hour=1.0)
    base.update(kw)
    return TrainConfig(**base)


def _weights(report):
    return load_file(str(Path(report["checkpoint"]) / "model.safetensors"))


def test_resume_reproduces_uninterrupted_run_exactly(data_dir, tmp_path):
    straight = train(_cfg(data_dir, tmp_path / "a", grad_accum=2))
    first = train(_cfg(data_dir, tmp_path / "b", grad_accum=2, stop_after=3))
    assert first["step"] == 3
    resumed = train(_cfg(data_dir, tmp_path / "b", grad_accum=2, resume=True))
    assert resumed["step"] == 6
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the routing bias (a buffer) is part of the state and moved during training
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and any(a[k].abs().sum() > 0 for k in bias)
    assert straight["val_bpb"] == resumed["val_bpb"]


def test_metrics_report_and_cost_meter(data_dir, tmp_path):
    report = train(_cfg(data_dir, tmp_path, max_steps=4, eval_interval=2))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lm_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and "max_violation" in r for r in train_rows)
    assert train_rows[-1]["tokens"] == 4 * 4 * 32
    assert any("val_bpb" in r for r in rows)
    assert report["dollars"] == pytest.approx(report["device_hours"] * 1.0, rel=1e-3)
    assert report["val_bpb"] > 0 and len(report["expert_load"]) == 3  # debug: 2 MoE layers + the MTP block
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["tokens_per_s"] == report["tokens_per_s"]


def test_loss_decreases_with_both_optimizers(data_dir, tmp_path):
    for opt in ("adamw", "muon"):
        train(_cfg(data_dir, tmp_path / opt, optimizer=opt, max_steps=30, eval_interval=0,
                   lr=1e-2, muon_lr=0.02, log_interval=1))
        rows = [json.loads(l) for l in (tmp_path / opt / "metrics.jsonl").read_text().splitlines() if "lm_loss" in l]
        assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 0.5, opt


def test_time_budget_sizes_steps_from_a_measured_step_time(data_dir, tmp_path):
    from gasungbi.train.budget import steps_for_budget
    # 100 s: 1 s steps, a 1 s validation batch x 2 batches every 10 steps and at the end: 2 + n + 2 n / 10 <= 100
    assert steps_for_budget(100, 1.0, 1.0, 10, 2) == 81 and steps_for_budget(1, 1.0, 1.0, 0, 2) == 1
    report = train(_cfg(data_dir, tmp_path / "a", time_budget=0.1, max_steps=10**6, warmup_steps=10**6,
                        eval_interval=0, stop_after=None))
    b = report["time_budget"]
    assert b["step_s"] > 0 and b["eval_batch_s"] > 0 and b["minutes"] == 0.1 and b["setup_s"] > 0
    assert b["max_steps"] == steps_for_budget(6 - b["setup_s"] - b["tail_s"], b["step_s"], b["eval_batch_s"], 0, 2)  # the setup's seconds and the tail's come off the budget
    assert b["warmup_steps"] == max(1, b["max_steps"] // 5)  # the schedule follows the sized horizon
    # at the end of warmup (and after 3 steps at least) the horizon is re-sized from the real steps' time
    assert b["resized"]["at_step"] == max(b["warmup_steps"], 3) and b["resized"]["step_s"] > 0
    assert report["step"] == report["max_steps"] == b["resized"]["max_steps"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["time_budget"] == b
    assert report["elapsed_s"] < 60  # a 6 s budget, loosely (a shared machine)
    # a resumed run keeps the steps it was sized to, whatever a new measurement would say
    first = train(_cfg(data_dir, tmp_path / "b", time_budget=0.03, eval_interval=0, stop_after=2))
    resumed = train(_cfg(data_dir, tmp_path / "b", time_budget=0.05, eval_interval=0, resume=True))
    assert resumed["max_steps"] == first["max_steps"] == first["time_budget"]["max_steps"]
    assert resumed["time_budget"]["resumed"]


def test_time_budget_resizes_the_horizon_from_the_real_steps(data_dir, tmp_path, monkeypatch):
    """A pre-training measurement 100x too optimistic sizes a run far too long; the real steps' time
    at the end of warmup brings it back into the budget, with the learning rate continuous."""
    import gasungbi.train.budget as budget_module
    real = budget_module.measure_seconds
    monkeypatch.setattr(budget_module, "measure_seconds", lambda *a, **k: tuple(t / 100 for t in real(*a, **k)))
    report = train(_cfg(data_dir, tmp_path / "a", time_budget=0.1, max_steps=10**6, warmup_steps=5,
                        eval_interval=0, stop_after=None, log_interval=1))
    b = report["time_budget"]
    assert b["resized"]["at_step"] == 5 and b["resized"]["max_steps"] < b["max_steps"] / 10
    assert report["step"] == report["max_steps"] == b["resized"]["max_steps"]
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "lr" in l]
    assert rows[4]["lr"] == pytest.approx(rows[5]["lr"], rel=0.01)  # the peak, then the decay begins
    assert rows[-1]["step"] == report["step"]


def test_short_budgets_get_short_budget_defaults():
    """At a few minutes, fields left at their defaults take the short-budget recipe; set ones stay."""
    from gasungbi.train.budget import SHORT_BUDGET, short_budget_defaults
    from gasungbi.train.trainer import TrainConfig

    short, changed = short_budget_defaults(TrainConfig(time_budget=1.0, lr=1e-3), TrainConfig())
    assert short.lr == 1e-3 and "lr" not in changed
    assert all(getattr(short, k) == v for k, v in SHORT_BUDGET.items() if k != "lr") and changed
    assert short_budget_defaults(TrainConfig(time_budget=30.0), TrainConfig())[1] == {}
    assert short_budget_defaults(TrainConfig(), TrainConfig())[1] == {}


def test_bias_update_moves_toward_even_load():
    from gasungbi import build_model, get_preset
    from gasungbi.train.objective import update_expert_bias
    model = build_model(get_preset("debug"), seed=0)
    moes = model.moe_layers()
    counts = torch.zeros(len(moes), moes[0].n_experts, dtype=torch.long)
    counts[0] = torch.tensor([10, 0, 2, 2, 2, 2, 2, 4])
    stats = update_expert_bias(model, counts, gamma=0.01)
    bias = moes[0].gate.e_score_correction_bias
    assert bias[0] == pytest.approx(-0.01) and bias[1] == pytest.approx(0.01) and bias[7] == pytest.approx(-0.01)
    assert stats["max_violation"] == pytest.approx((10 - 3) / 3)
    assert stats["load"][0] == [10, 0, 2, 2, 2, 2, 2, 4]
    assert all(m.gate.e_score_correction_bias.abs().sum() == 0 for m in moes[1:])  # no tokens: no update


def test_schedules():
    assert lr_multiplier(0, 100, 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, 10) == pytest.approx(1.0)
    assert lr_multiplier(99, 100, 10, "cosine", 0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_multiplier(50, 100, 10, "wsd", 0.1, 0.2) == 1.0
    assert lr_multiplier(90, 100, 10, "wsd", 0.1, 0.2) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="schedule"):
        lr_multiplier(50, 100, 10, "linear")


def test_newton_schulz_orthogonalizes():
    g = torch.randn(3, 16, 32)  # batched, like stacked experts
    x = newton_schulz(g, steps=10)
    s = torch.linalg.svdvals(x)
    assert (s - 1).abs().max() < 0.35  # the quintic iteration lands singular values in ~[0.7, 1.2]


def test_bad_config_is_rejected(data_dir, tmp_path):
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        train(_cfg(data_dir, tmp_path, optimizer="sgd"))
    with pytest.raises(ValueError, match="data"):
        train(_cfg(data_dir, tmp_path, data=""))


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "gasungbi", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigint_saves_and_resume_finishes(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out-dir", str(out), "--model", "debug", "--batch-size", "4",
            "--seq-len", "32", "--max-steps", "100000", "--eval-interval", "0", "--log-interval", "1",
            "--no-progress", "--sample-tokens", "2", "--device", "cpu"]
    proc = _cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and
                                          len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "interrupted by signal" in output and "Traceback" not in output
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and 3 <= report["step"] < 100000
    assert (out / "latest").read_text().strip() == f"step_{report['step']:06d}"
    # resuming continues from the saved step (run two more steps by lowering the horizon)
    proc = _cli(*[a if a != "100000" else str(report["step"] + 2) for a in args], "--resume")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    assert json.loads((out / "report.json").read_text())["step"] == report["step"] + 2


def test_cli_config_file_and_overrides(data_dir, tmp_path):
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps({"batch_size": 2, "seq_len": 16, "max_steps": 2, "eval_interval": 0}))
    proc = _cli("train", "--config", str(cfg_file), "--data", str(data_dir), "--out-dir", str(tmp_path / "r"),
                "--model", "debug", "--set", "num_hidden_layers=2", "--no-progress", "--max-steps", "3",
                "--device", "cpu")
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["batch_size"] == 2 and saved["train"]["max_steps"] == 3
    assert saved["model"]["num_hidden_layers"] == 2
    proc = _cli("train", "--data", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "x"))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "missing" in output and "Traceback" not in output

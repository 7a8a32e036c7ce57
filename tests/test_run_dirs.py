"""Never lose a run (issue 11 §2): a run directory that holds a run is refused unless --resume or
--overwrite; pruning keeps the checkpoint `latest` names and the newest; after kill -9 and --resume,
metrics.jsonl has one row per logged step. For train, sft, grpo, distill and the speedrun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for

from gasungbi import build_model, get_preset, save_model
from gasungbi.data.conventions import CHAT_TEMPLATE
from gasungbi.data.prepare import prepare_corpus
from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer


def rows(run: Path, key: str = "lm_loss") -> list[int]:
    """The steps of the metrics.jsonl rows that hold ``key``, in file order."""
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    (root / "corpus.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(4000)))
    prepare_corpus(str(root / "corpus.txt"), root / "shards", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    docs = [f"What is {a} + {b}? <answer>{a + b}</answer>" for a in range(30) for b in range(10)]
    tok = train_tokenizer(docs, 300)
    save_tokenizer(tok, root / "tok", chat_template=CHAT_TEMPLATE)
    save_model(build_model(get_preset("debug").replace(vocab_size=tok.get_vocab_size()), seed=0), root / "ckpt",
               tokenizer=root / "tok")
    with open(root / "chats.jsonl", "w") as f:
        for a in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} + 1?"},
                                             {"role": "assistant", "content": f"<answer>{a + 1}</answer>"}]}) + "\n")
    return root


def train_args(shards, out, *extra):
    return ["train", "--data", shards, "--out-dir", out, "--model", "debug", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--sample-tokens", "2", "--log-interval", "1", "--no-progress", "--device", "cpu",
            *extra]


def test_train_rerun_is_refused_unless_resume_or_overwrite(shards, tmp_path, cli, one_line_error):
    run = tmp_path / "R"
    args = train_args(shards, run, "--max-steps", "8", "--ckpt-interval", "2", "--keep-checkpoints", "2",
                      "--eval-interval", "0")
    assert cli(*args).returncode == 0
    before = sorted(p.name for p in run.iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    assert {"step_000006", "step_000008"} <= set(before)

    err = one_line_error(cli(*args, "--stop-after", "2"), "train")
    assert str(run) in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in run.iterdir()) == before and (run / "metrics.jsonl").read_text() == metrics
    assert "choose one" in one_line_error(cli(*args, "--resume", "--overwrite"), "train")

    # --overwrite replaces the run: its checkpoint survives pruning and metrics hold this run only
    r = cli(*args, "--overwrite", "--stop-after", "2")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint: {run / 'step_000002'}" in r.stdout
    assert (run / "latest").read_text().strip() == "step_000002" and (run / "step_000002").is_dir()
    assert not (run / "step_000008").exists()
    assert rows(run) == [1, 2]


def test_pruning_never_removes_latest_or_newest(shards, tmp_path, cli):
    run = tmp_path / "R"
    args = train_args(shards, run, "--max-steps", "10", "--ckpt-interval", "2", "--eval-interval", "0")
    assert cli(*args, "--keep-checkpoints", "5").returncode == 0
    # rewind to step 4 (as after a loss spike) and keep fewer checkpoints from now on
    (run / "latest").write_text("step_000004\n")
    r = cli(*args, "--resume", "--keep-checkpoints", "2", "--stop-after", "5")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint: {run / 'step_000005'}" in r.stdout
    assert (run / "latest").read_text().strip() == "step_000005" and (run / "step_000005").is_dir()
    assert (run / "step_000010").is_dir()  # the newest
    assert sorted(p.name for p in run.glob("step_*")) == ["step_000005", "step_000010"]
    assert rows(run) == [1, 2, 3, 4, 5]  # the rewound steps' rows are gone, each step logged once


def test_kill_9_then_resume_logs_each_step_once(shards, tmp_path, cli):
    run = tmp_path / "R"
    args = train_args(shards, run, "--max-steps", "100000", "--ckpt-interval", "25", "--eval-interval", "10",
                      "--eval-batches", "1")
    proc = subprocess.Popen([sys.executable, "-m", "gasungbi", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def logged_past_checkpoint() -> bool:  # rows written after the newest checkpoint: the ones a kill repeats
        if not (run / "latest").exists() or not (run / "metrics.jsonl").exists():
            return False
        saved = int((run / "latest").read_text().strip().split("_")[1])
        steps = rows(run)
        return bool(steps) and steps[-1] >= saved + 3
    try:
        wait_for(logged_past_checkpoint, proc, "rows logged past a checkpoint")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert logged_past_checkpoint()
    saved = int((run / "latest").read_text().strip().split("_")[1])
    r = cli(*[a if a != "100000" else str(saved + 12) for a in args], "--resume")
    assert r.returncode == 0, r.stderr
    assert rows(run) == list(range(1, saved + 13))
    val = rows(run, "val_loss")
    assert len(val) == len(set(val)) and val[-1] == saved + 12


def test_sft_grpo_and_distill_refuse_an_existing_run(chat_ckpt, tmp_path, cli, one_line_error):
    ckpt = chat_ckpt / "ckpt"
    sft = ["sft", "--init-from", ckpt, "--data", chat_ckpt / "chats.jsonl", "--out-dir", tmp_path / "sft",
           "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--sample-tokens", "2",
           "--log-interval", "1", "--no-progress", "--device", "cpu"]
    assert cli(*sft).returncode == 0
    assert "--overwrite" in one_line_error(cli(*sft), "sft")
    assert rows(tmp_path / "sft") == [1, 2]

    grpo = ["grpo", "--init-from", ckpt, "--out-dir", tmp_path / "grpo", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-tasks", "2", "--ckpt-interval", "1",
            "--keep-checkpoints", "3", "--no-progress"]
    assert cli(*grpo).returncode == 0
    assert "--resume" in one_line_error(cli(*grpo), "grpo")
    # a resume from step 1 (as after a kill during step 2) logs step 2 once
    (tmp_path / "grpo" / "latest").write_text("step_000001\n")
    assert cli(*grpo, "--resume").returncode == 0
    assert rows(tmp_path / "grpo", "reward") == [1, 2]

    distill = ["distill", "--teacher", ckpt, "--student", ckpt, "--out-dir", tmp_path / "distill", "--prompts", "3",
               "--samples-per-prompt", "1", "--reward", "format", "--min-reward", "0", "--sft-steps", "1",
               "--batch-size", "2", "--seq-len", "64", "--max-new-tokens", "4"]
    assert cli(*distill).returncode == 0
    err = one_line_error(cli(*distill), "distill")
    assert str(tmp_path / "distill") in err and "--overwrite" in err
    assert rows(tmp_path / "distill" / "student") == [1]


def test_speedrun_rerun_resumes_and_logs_each_step_once(tmp_path):
    from gasungbi.pipeline import speedrun

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text("\n".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    tiny = dict(model="debug", batch_size=4, seq_len=32, device="cpu", eval_batches=2, sample_tokens=2, progress=False)
    post = dict(sft_examples=20, sft_steps=2, sft_batch=4, grpo_steps=1, prompts_per_step=2, group_size=2,
                max_new_tokens=4, eval_tasks=2)
    out = tmp_path / "speedrun"
    first = speedrun("cpu", out=out, corpus=str(corpus), steps=3, overrides=tiny, post=post)
    again = speedrun("cpu", out=out, corpus=str(corpus), steps=3, overrides=tiny, post=post)
    assert again["step"] == first["step"] == 3 and again["val_bpb"] == first["val_bpb"]
    assert rows(out / "train") == [1, 2, 3] and rows(out / "train", "val_loss") == [1, 2, 3]
    assert rows(out / "sft") == [2] and rows(out / "grpo", "reward") == [1]

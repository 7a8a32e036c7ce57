"""The speedrun pipeline end to end at tiny sizes: every recipe (cpu, gpu, node) runs on this CPU."""

import json
import time

import pytest
import torch

from gasungbi.pipeline import RECIPES, speedrun

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (root / f"m{i}.py").write_text("\n".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(40)))
    return root


TINY = dict(model="debug", batch_size=4, seq_len=32, device="cpu", eval_batches=2, sample_tokens=8, progress=False)
TINY_POST = dict(sft_examples=40, sft_steps=2, sft_batch=4, grpo_steps=1, prompts_per_step=2, group_size=2,
                 max_new_tokens=4, eval_tasks=4)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_speedrun_recipe_at_tiny_size(recipe, corpus, tmp_path):
    report = speedrun(recipe, out=tmp_path, corpus=str(corpus), steps=4, overrides=TINY, post=TINY_POST)
    assert report["step"] == 4 and not report["interrupted"]
    assert report["post"]["sft"]["steps"] == 2 and report["post"]["grpo"]["after"]["n"] == 4
    md = (tmp_path / "report.md").read_text()
    for needle in ("validation bits per byte", "MFU", "device-hours", "cost", "Expert load", "Sample", "loss.png",
                   "Held-out gym accuracy", "after GRPO", "paired", "## Stages", "a fixed number of steps",
                   "the recipe's 2 steps, within its", "the recipe's 1 steps, within its"):
        assert needle in md
    # base, SFT and GRPO scored on the same held-out tasks; each gain with a paired interval
    post, held = report["post"], report["post"]["held_out"]
    assert held["n"] == 4 and held["split"] == "test"
    for gain in held["gains"].values():
        assert gain["n"] == 4 and gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]
    assert held["gains"]["total"]["gain"] == pytest.approx(post["grpo"]["after"]["accuracy"] - post["eval_base"]["accuracy"])
    assert held["gains"]["sft"]["after"] == post["grpo"]["before"]["accuracy"]
    assert set(report["stages"]) == {"pretrain", "eval_base", "sft", "grpo"}
    assert all(s["elapsed_s"] >= 0 and s["dollars"] >= 0 for s in report["stages"].values())
    assert json.loads((tmp_path / "report.json").read_text())["post"]["held_out"] == held
    assert (tmp_path / "loss.png").exists()
    final = tmp_path / "final"
    assert (final / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    tok = transformers.AutoTokenizer.from_pretrained(final)
    ids = tok("def f", return_tensors="pt").input_ids
    from gasungbi import load_model
    ours = load_model(final)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["val_bpb"] == report["val_bpb"] > 0


def test_speedrun_pretrains_by_the_clock_and_says_so(corpus, tmp_path):
    report = speedrun("cpu", out=tmp_path, corpus=str(corpus), minutes=0.05, overrides=TINY, post=False)
    note = report["stages"]["pretrain"]["note"]
    assert note.startswith("trained by the clock within its 0.05-minute budget") and note in (tmp_path / "report.md").read_text()
    b = report["time_budget"]
    assert b["minutes"] == 0.05 and b["stopped_by_clock"] and report["max_steps"] is None


def test_speedrun_shortens_a_post_training_stage_that_cannot_fit_and_says_so(corpus, tmp_path):
    post = {**TINY_POST, "sft_steps": 3, "grpo_steps": 3, "sft_minutes": 1e-5, "grpo_minutes": 1e-4}
    report = speedrun("cpu", out=tmp_path, corpus=str(corpus), steps=2, overrides=TINY, post=post)
    sft, grpo = report["stages"]["sft"], report["stages"]["grpo"]
    assert sft["steps"] == 1 and sft["note"].startswith("**shortened**: stopped after 1 of the recipe's 3 steps")
    assert grpo["steps"] == 1 and grpo["note"].startswith("**shortened**: stopped after 1 of the recipe's 3 steps")
    md = (tmp_path / "report.md").read_text()
    assert sft["note"] in md and grpo["note"] in md
    assert "40 worked addition tasks" in sft["note"] and "temperature 0.7" in grpo["note"]  # the cpu recipe's


def test_speedrun_deadline_shares_what_is_left(corpus, tmp_path):
    """A stage that starts with less of the whole run's deadline left than the stages still to run
    asked for gets the same share of what is left, and the report says how much it got."""
    import dataclasses

    from gasungbi.pipeline import Clock

    clock = Clock(20.0, {"a": 6.0, "b": 3.0, "c": 3.0})
    clock.deadline = clock.t0 + 6 * 60  # 6 minutes left for 12 asked: half
    assert clock.share("a") == pytest.approx(3.0, rel=0.01)
    clock.deadline = time.perf_counter() + 1.5 * 60  # 1.5 minutes left for the last stage's 3
    assert clock.share("c") == pytest.approx(1.5, rel=0.01)
    assert clock.note("c").startswith("**1.50 of its 3 minutes**")
    recipe = dataclasses.replace(RECIPES["cpu"], deadline_minutes=1e-4)  # long gone by GRPO: the floor
    report = speedrun(recipe, out=tmp_path, corpus=str(corpus), steps=2, overrides=TINY, post=TINY_POST)
    assert "**0.05 of its 3.5 minutes**" in report["stages"]["grpo"]["note"]
    assert json.loads((tmp_path / "grpo" / "report.json").read_text())["time_budget"] == 0.05


def test_speedrun_rerun_reuses_data_and_resumes(corpus, tmp_path):
    speedrun("cpu", out=tmp_path, corpus=str(corpus), steps=3, overrides=TINY, post=False)
    report = speedrun("cpu", out=tmp_path, corpus=str(corpus), steps=3, overrides=TINY, post=False)
    assert report["step"] == 3  # nothing left to train: the finished run is reported again
    plan = json.loads((tmp_path / "speedrun.json").read_text())
    assert plan == {"corpus": str(corpus), "vocab_size": 4096, "schedule": {"steps": 3}}

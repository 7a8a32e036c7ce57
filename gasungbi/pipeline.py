"""``gasungbi speedrun``: the whole pipeline in one command, as nanochat's speedrun.sh.

    corpus -> BPE tokenizer -> token shards -> pretraining (MoE + MLA + MTP) -> held-out gym
    accuracy of the base model -> cold-start SFT -> GRPO -> report.md -> OUT/final (Hugging Face)

Recipes (:data:`RECIPES`; the arithmetic in the comments):

* ``cpu`` (default), a 2-core machine in under 15 minutes: the Python standard library (~12 MB of
  source, ~3.4 M tokens at 4096 BPE), ``cpu-tiny`` (10.2 M parameters, ~4 M activated), 16 x 256 =
  4,096 tokens per step: at 2,000-4,000 tokens/s, 5.5 minutes of pretraining is 0.7-1.3 M tokens.
  Then the base model's held-out accuracy and 350 steps of cold-start SFT in 4 minutes, and 70
  GRPO steps with their two held-out evaluations in 3.5.
* ``gpu``: one GPU; ``small`` (148 M, ~56 M activated), 64 x 1024 = 65 k tokens per step for 60
  minutes (an H100 at ~40% MFU does ~150 k tokens/s: ~0.5 B tokens, ~$2.5 at $2.5/h).
* ``node``: ``torchrun --nproc_per_node=8 -m gasungbi speedrun --recipe node``; the same model
  with FSDP2, 256 x 1024 tokens per step.

Time. Every stage trains by the clock (:class:`gasungbi.train.budget.Budget`): its learning rate
follows the fraction of its minutes spent and it stops in time for what follows its last step, so
a slower or busier machine trains fewer steps of the same schedule. A recipe with a deadline for
the whole run gives each stage, when it starts, its minutes or, when less time is left than the
stages still to run asked for, the same share of what is left (data preparation and the final
checkpoint come off first); the report's stage table says which stage got less than it asked for,
and how much less. Each stage's held-out evaluation is inside its minutes (the base model's is the
SFT stage's first part). Running the command again resumes an interrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from gasungbi.errors import UserError
from gasungbi.train.trainer import TrainConfig


@dataclass(frozen=True)
class PostTraining:
    """Cold-start SFT on the gym's tasks, then GRPO (R1's recipe in miniature), so the final
    checkpoint answers in <think>...</think><answer>...</answer>."""

    task: str = "addition"  # the gym task family of SFT, GRPO and the held-out evaluations
    difficulty: int = 2  # two-digit operands
    sft_examples: int = 3000  # worked tasks (the column-sum trace of gym.cold_start)
    sft_steps: int = 350  # SFT's steps, at most: enough to teach the format, leaving GRPO errors to fix
    sft_batch: int = 16
    sft_lr: float = 1e-3
    sft_minutes: float = 4.0  # the SFT stage: the base model's evaluation, then SFT
    grpo_steps: int = 70  # GRPO's steps, at most
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 32  # the longest completion (a column trace and the answer fit)
    eval_tasks: int = 1000  # held-out tasks (the test split holds a quarter of the two-digit sums)
    grpo_lr: float = 2e-5  # small: AdamW moves every weight by about lr per step, noise included
    grpo_temperature: float = 0.7  # rollouts sampled below 1 find the answers to reinforce more often
    grpo_minutes: float = 3.5  # the GRPO stage, its two held-out evaluations included


@dataclass(frozen=True)
class Recipe:
    """A speedrun: the corpus's tokenizer, the pretraining run, post-training, and the deadline."""

    vocab_size: int
    tokenizer_bytes: int  # the tokenizer is trained on the corpus's first bytes
    minutes: float  # pretraining
    train: dict  # TrainConfig fields of pretraining
    post: PostTraining = field(default_factory=PostTraining)
    deadline_minutes: float | None = None  # the whole run, from the command's start

    def stages(self, post: PostTraining | None) -> dict[str, float]:
        """Each stage's minutes, in order."""
        if post is None:
            return {"pretrain": self.minutes}
        return {"pretrain": self.minutes, "sft": post.sft_minutes, "grpo": post.grpo_minutes}


GPU_POST = PostTraining(task="arithmetic", sft_examples=20000, sft_steps=1000, sft_batch=64, grpo_steps=200,
                        prompts_per_step=32, group_size=16, max_new_tokens=64, eval_tasks=500, grpo_lr=1e-5,
                        grpo_temperature=1.0, sft_minutes=15.0, grpo_minutes=20.0)

RECIPES = {
    "cpu": Recipe(vocab_size=4096, tokenizer_bytes=20_000_000, minutes=5.5, deadline_minutes=14.5,
                  train=dict(model="cpu-tiny", batch_size=16, seq_len=256, lr=3e-3, warmup_steps=20,
                             bias_update_speed=0.01, eval_batches=16, device="cpu", sample_prompt="def ")),
    "gpu": Recipe(vocab_size=32768, tokenizer_bytes=200_000_000, minutes=60.0, post=GPU_POST,
                  train=dict(model="small", batch_size=64, seq_len=1024, lr=3e-3, warmup_steps=100,
                             eval_batches=50, device="auto", sample_prompt="def ")),
    "node": Recipe(vocab_size=32768, tokenizer_bytes=200_000_000, minutes=60.0, post=GPU_POST,
                   train=dict(model="small", batch_size=256, seq_len=1024, lr=3e-3, warmup_steps=100,
                              eval_batches=50, device="auto", parallel="fsdp", sample_prompt="def ")),
}

FINAL_S = 20.0
"""Seconds a deadline keeps for the final checkpoint and the report."""

MIN_SHARE = 0.05
"""Minutes a stage gets at least, however little of the deadline is left (its first step runs)."""


class Clock:
    """The whole run's deadline, and each stage's share of it (see the module docstring)."""

    def __init__(self, deadline_minutes: float | None, stages: dict[str, float]):
        self.t0 = time.perf_counter()
        self.deadline = None if deadline_minutes is None else self.t0 + deadline_minutes * 60 - FINAL_S
        self.stages, self.given = stages, {}

    def share(self, stage: str) -> float:
        """Minutes for ``stage``, which starts now."""
        asked = self.stages[stage]
        if self.deadline is None:
            minutes = asked
        else:
            later = list(self.stages)[list(self.stages).index(stage):]
            left = max(0.0, (self.deadline - time.perf_counter()) / 60)
            minutes = min(asked, max(MIN_SHARE, asked * left / sum(self.stages[s] for s in later)))
        self.given[stage] = minutes
        return minutes

    def note(self, stage: str) -> str:
        """What the report says about the stage's minutes."""
        asked, given = self.stages[stage], self.given[stage]
        if given >= asked:
            return f"its {asked:g}-minute budget"
        return f"**{given:.2f} of its {asked:g} minutes** (less time was left of the whole run's)"


def speedrun(recipe: str | Recipe = "cpu", out: str | Path = "runs/speedrun", corpus: str = "stdlib",
             minutes: float | None = None, steps: int | None = None, price_per_hour: float | None = None,
             overrides: dict | None = None, post: dict | bool | None = None) -> dict:
    """Run the pipeline; returns the report. ``recipe``: a name of :data:`RECIPES` or a
    :class:`Recipe`; ``minutes``: pretraining's; ``steps``: a fixed number of pretraining steps
    instead; ``overrides``: pretraining's TrainConfig fields; ``post``: :class:`PostTraining`
    fields, or False to skip post-training."""
    from gasungbi.interop.hf import load_model, save_model
    from gasungbi.train.trainer import train

    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        recipe = RECIPES[recipe]
    if minutes is not None:
        recipe = dataclasses.replace(recipe, minutes=minutes)
    p = None if post is False else dataclasses.replace(recipe.post, **(post or {}))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(recipe.deadline_minutes, recipe.stages(p))

    data, manifest = _prepare(out, recipe, corpus, steps)  # 1-2: tokenizer and shards
    t_data = time.perf_counter() - clock.t0
    tc = _pretrain_config(recipe, out, data, steps, price_per_hour, overrides, clock)
    print(f"[3/5] pretraining {tc.model} " + (f"for {steps} steps" if steps else
                                             f"for {tc.time_budget:.2f} minutes, by the clock"))
    report = train(tc)
    report["stages"] = {"pretrain": {
        "steps": report["step"], "elapsed_s": report["elapsed_s"], "dollars": report["dollars"],
        "minutes": None if steps else clock.given["pretrain"],
        "note": "a fixed number of steps (--steps)" if steps else
                f"trained by the clock within {clock.note('pretrain')}: {report['step']} steps"}}
    if report["interrupted"]:
        print("speedrun interrupted; run the same command again to resume")
        return report
    final_source = report["checkpoint"]
    if p is not None:  # 4. cold-start SFT on the gym, then GRPO
        report["post"] = post_train(out, tc, report["checkpoint"], p, clock)
        final_source = report["post"]["grpo"]["checkpoint"]
        for stage in ("eval_base", "sft", "grpo"):
            s = report["post"][stage]
            report["stages"][stage] = {
                "steps": s.get("steps", 0), "elapsed_s": s["elapsed_s"], "minutes": s.get("minutes"),
                "dollars": s.get("dollars", round(s["elapsed_s"] / 3600 * report["price_per_device_hour"], 5)),
                "note": s.get("note", "")}

    final = out / "final"  # 5. the final checkpoint and the report
    if final.exists():
        shutil.rmtree(final)
    save_model(load_model(final_source), final, tokenizer=data)
    report.update(final_checkpoint=str(final), wall_clock_s=round(time.perf_counter() - clock.t0, 1),
                  data_prep_s=round(t_data, 1), deadline_minutes=recipe.deadline_minutes)
    write_report(out, tc, report, manifest)
    print(f"[5/5] report: {out / 'report.md'}\n"
          f"val bits/byte {report['val_bpb']:.4f} | {report['tokens']:,} tokens | {report['tokens_per_s']:,.0f} tok/s | "
          f"MFU {report['mfu']:.1%} | {report['device_hours']:.4f} device-hours = ${report['dollars']:.4f} | "
          f"total {report['wall_clock_s'] / 60:.1f} min\n"
          f"checkpoint: {final}  (transformers.AutoModelForCausalLM.from_pretrained loads it)")
    return report


def _prepare(out: Path, recipe: Recipe, corpus: str, steps: int | None):
    """Tokenizer and shards in OUT/data (reused when an earlier run made them from the same corpus);
    a run whose pretraining schedule changed (``--steps``) starts its stages over."""
    from gasungbi.data.prepare import prepare_corpus
    from gasungbi.data.shards import load_manifest

    data, plan_file = out / "data", out / "speedrun.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    if (plan.get("corpus"), plan.get("vocab_size")) != (corpus, recipe.vocab_size) or \
            not (data / "manifest.json").exists():
        print(f"[1/5] tokenizer and shards from {corpus}")
        prepare_corpus(corpus, data, vocab_size=recipe.vocab_size, tokenizer_bytes=recipe.tokenizer_bytes,
                       val_fraction=0.02)
        plan = {"corpus": corpus, "vocab_size": recipe.vocab_size}
    else:
        print(f"[1/5] reusing tokenizer and shards in {data}")
    schedule = {"steps": steps} if steps else {"minutes": recipe.minutes}
    if plan.get("schedule") not in (None, schedule) and (out / "train").exists():
        print(f"      a different schedule than the earlier run in {out / 'train'}: starting over")
        for stage in ("train", "sft", "grpo"):
            shutil.rmtree(out / stage, ignore_errors=True)
        (out / "eval_base.json").unlink(missing_ok=True)  # made from the earlier pretrained model
    plan_file.write_text(json.dumps({**plan, "schedule": schedule}, indent=2))
    return data, load_manifest(data)


def _pretrain_config(recipe: Recipe, out: Path, data: Path, steps: int | None, price_per_hour: float | None,
                     overrides: dict | None, clock: Clock) -> TrainConfig:
    """Pretraining's run: ``steps`` steps, or the pretraining stage's minutes by the clock."""
    tc = TrainConfig(data=str(data), out_dir=str(out / "train"), price_per_hour=price_per_hour, resume=True,
                     eval_interval=50, ckpt_interval=50, log_interval=10, **recipe.train)
    if overrides:
        tc = dataclasses.replace(tc, **overrides)
    if steps:
        every = max(1, steps // 5)
        return dataclasses.replace(tc, max_steps=steps, time_budget=None, eval_interval=every, ckpt_interval=every,
                                   log_interval=max(1, min(10, steps // 20)))
    return dataclasses.replace(tc, max_steps=None, time_budget=clock.share("pretrain"))


def _post_lines(report: dict) -> list[str]:
    """report.md's held-out accuracy table (paired gains) and per-stage time and cost table."""
    post, stages = report.get("post"), report.get("stages") or {}
    lines = []
    if post:
        h, g = post["held_out"], post["held_out"]["gains"]
        rows = [("base (pretrained)", post["eval_base"], None), ("after cold-start SFT", post["grpo"]["before"], g["sft"]),
                (f"after GRPO ({post['grpo']['steps']} steps)", post["grpo"]["after"], g["grpo"])]
        lines += ["", f"## Held-out gym accuracy: {h['n']} {h['task']} tasks (difficulty {h['difficulty']}) of the "
                  f"test split, greedy", "",
                  "No stage trained on these tasks (SFT and GRPO draw from the train split). Gains are paired on the "
                  "same tasks: Newcombe's 95% interval for a paired difference, McNemar's exact p.", "",
                  "| model | accuracy [95% Wilson] | gain over the row above [paired 95%] | tasks gained / lost | "
                  "McNemar p |", "| --- | --- | --- | --- | --- |"]
        for name, r, gain in rows:
            acc = f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
            if gain is None:
                lines.append(f"| {name} | {acc} | | | |")
            else:
                lines.append(f"| {name} | {acc} | {gain['gain']:+.3f} [{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}] | "
                             f"{gain['gained']} / {gain['lost']} | {gain['mcnemar_p']:.3g} |")
        t = g["total"]
        lines.append(f"| base to GRPO | | {t['gain']:+.3f} [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | "
                     f"{t['gained']} / {t['lost']} | {t['mcnemar_p']:.3g} |")
    if stages:
        lines += ["", "## Stages", "", "| stage | steps | wall-clock | cost | note |", "| --- | --- | --- | --- | --- |"]
        names = {"pretrain": "pretraining", "eval_base": "held-out eval of the base model", "sft": "cold-start SFT",
                 "grpo": "GRPO"}
        for key, st in stages.items():
            t = st["elapsed_s"]
            lines.append(f"| {names.get(key, key)} | {st['steps'] or ''} | "
                         f"{f'{t / 60:.1f} min' if t >= 120 else f'{t:.0f} s'} | "
                         f"${st['dollars']:.4f} | {st['note']} |")
    return lines


def post_train(out: Path, tc: TrainConfig, pretrained: str, p: PostTraining, clock: Clock) -> dict:
    """Cold-start SFT on a gym task (R1 Sec. 2.3.1), then GRPO; both resume on a rerun.

    Held-out accuracy: the base (pretrained) model, the SFT'd model (GRPO's "before") and the GRPO'd
    model are scored greedily on the same ``eval_tasks`` tasks of the gym's test split (SFT and GRPO
    draw from the train split; pretraining saw no gym task), so each gain has a paired 95% interval
    (:func:`gasungbi.eval.tasks.paired_gain`). The SFT stage's minutes include the base model's
    evaluation, the GRPO stage's its two evaluations."""
    from gasungbi.eval.tasks import paired_gain
    from gasungbi.gym.cold_start import cold_start_conversations, write_jsonl
    from gasungbi.post.grpo import GRPOConfig, grpo
    from gasungbi.post.sft import sft as run_sft

    device = "cuda" if torch.cuda.is_available() and tc.device != "cpu" else "cpu"
    sft_started, sft_minutes = time.perf_counter(), clock.share("sft")
    print(f"[4/5] the base model's held-out accuracy, then cold-start SFT for up to {p.sft_steps} steps "
          f"({sft_minutes:.2f} minutes), then GRPO for up to {p.grpo_steps} steps")
    base = _evaluate_base(out / "eval_base.json", pretrained, p, tc.seed, device)
    convs = cold_start_conversations(p.task, p.sft_examples, p.difficulty, seed=tc.seed)
    gym = write_jsonl(convs, out / "gym_sft.jsonl")
    sft = run_sft(TrainConfig(init_from=pretrained, data=str(gym), out_dir=str(out / "sft"), batch_size=p.sft_batch,
                              seq_len=_sft_seq_len(pretrained, convs), max_steps=p.sft_steps, time_budget=sft_minutes,
                              lr=p.sft_lr, warmup_steps=10, eval_interval=0, ckpt_interval=0, log_interval=10,
                              device=tc.device, resume=True, progress=tc.progress, seed=tc.seed,
                              price_per_hour=tc.price_per_hour, sample_tokens=2), started=sft_started)
    grpo_minutes = clock.share("grpo")
    g = grpo(GRPOConfig(init_from=sft["checkpoint"], out_dir=str(out / "grpo"), task=p.task, difficulty=p.difficulty,
                        steps=p.grpo_steps, prompts_per_step=p.prompts_per_step, group_size=p.group_size,
                        max_new_tokens=p.max_new_tokens, lr=p.grpo_lr, temperature=p.grpo_temperature,
                        eval_tasks=p.eval_tasks, ckpt_interval=0, device=device, resume=True, progress=tc.progress,
                        seed=tc.seed, price_per_hour=tc.price_per_hour, time_budget=grpo_minutes))
    outcomes = {"base": base["per_task"], "sft": g["before"]["per_task"], "grpo": g["after"]["per_task"]}
    held_out = {"task": p.task, "difficulty": p.difficulty, "n": base["n"], "split": "test", "decoding": "greedy",
                "gains": {"sft": paired_gain(outcomes["base"], outcomes["sft"]),
                          "grpo": paired_gain(outcomes["sft"], outcomes["grpo"]),
                          "total": paired_gain(outcomes["base"], outcomes["grpo"])}}
    sft_note = (_steps_note(sft["step"], p.sft_steps, clock, "sft") + f"; {p.sft_examples:,} worked {p.task} tasks "
                f"(a short <think> trace, then the <answer>), batch {p.sft_batch}, lr {p.sft_lr:g}; the stage's "
                f"minutes include the base model's evaluation ({base['elapsed_s']:.0f} s)")
    grpo_note = (_steps_note(g["steps"], p.grpo_steps, clock, "grpo") + f"; {p.prompts_per_step} prompts x "
                 f"{p.group_size} completions per step, sampled at temperature {p.grpo_temperature:g}, rewarded for "
                 f"a correct answer and the <think>/<answer> format, lr {p.grpo_lr:g}; the time includes its held-out "
                 "evaluations (after SFT, after GRPO)")
    return {"eval_base": {k: v for k, v in base.items() if k != "per_task"},
            "sft": {"steps": sft["step"], "val_loss": sft["val_loss"], "elapsed_s": sft["elapsed_s"],
                    "dollars": sft["dollars"], "minutes": clock.given["sft"], "note": sft_note},
            "grpo": {"steps": g["steps"], "planned_steps": g["planned_steps"], "before": g["before"],
                     "after": g["after"], "checkpoint": g["checkpoint"], "elapsed_s": g["elapsed_s"],
                     "dollars": g["dollars"], "minutes": clock.given["grpo"], "note": grpo_note},
            "held_out": held_out}


def _steps_note(done: int, recipe_steps: int, clock: Clock, stage: str) -> str:
    if done >= recipe_steps:
        return f"the recipe's {recipe_steps} steps, within {clock.note(stage)}"
    return (f"**shortened**: stopped after {done} of the recipe's {recipe_steps} steps, when "
            f"{clock.note(stage)} was spent")


def _evaluate_base(path: Path, pretrained: str, p: PostTraining, seed: int, device: str) -> dict:
    """The base model's held-out accuracy, kept in ``path`` so a rerun does not score it again."""
    from gasungbi.eval.accuracy import evaluate_checkpoint

    if path.exists():
        return json.loads(path.read_text())
    t = time.perf_counter()
    r = evaluate_checkpoint(pretrained, p.task, p.difficulty, n=p.eval_tasks, max_new_tokens=p.max_new_tokens,
                            seed=seed, device=device)
    base = {"accuracy": r["pass@1"], "ci95": list(r["ci95"]), "n": r["n_tasks"], "per_task": r["per_task"],
            "elapsed_s": round(time.perf_counter() - t, 2)}
    path.write_text(json.dumps(base))
    return base


def _sft_seq_len(pretrained: str, convs: list[list[dict]]) -> int:
    """SFT's row length: the longest conversation under the checkpoint's chat template, rounded up to
    8, so none is cut and each row holds one gym conversation with little padding."""
    from gasungbi.data.conventions import Conventions
    from gasungbi.data.sft import tokenize_conversation

    tok = Conventions.load(pretrained)
    return -(-max(len(tokenize_conversation(tok, c)[0]) for c in convs) // 8) * 8


def write_report(out: Path, tc: TrainConfig, report: dict, manifest) -> Path:
    """report.md: config, tokens, time, dollars, MFU, loss curve, expert load, samples."""
    from gasungbi.model.accounting import count_params
    from gasungbi.config import from_hf_config

    cfg = from_hf_config(report["model"])
    pc = count_params(cfg)
    loss_png = Path(tc.out_dir) / "loss.png"
    if loss_png.exists():
        shutil.copyfile(loss_png, out / "loss.png")
    load_rows = []
    for i, load in enumerate(report.get("expert_load") or []):
        total = sum(load) or 1
        load_rows.append(f"| {i} | " + " ".join(f"{100 * c / total:.0f}" for c in load) + " |")
    lines = [
        "# gasungbi speedrun report", "",
        f"* model: `{tc.model}` ({cfg.model_type}): {pc.total_with_mtp / 1e6:.2f} M parameters, "
        f"{pc.activated / 1e6:.2f} M activated; {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
        f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} + {cfg.n_shared_experts} shared, "
        f"MLA latent {cfg.kv_lora_rank}, MTP depth {cfg.num_nextn_predict_layers}",
        f"* data: {manifest.source}; train {manifest.splits['train'].tokens:,} tokens, "
        f"val {manifest.splits['val'].tokens:,} tokens, vocabulary {manifest.vocab_size}",
        f"* training: {report['step']} steps x {tc.batch_size} x {tc.seq_len} tokens = {report['tokens']:,} tokens, "
        f"{tc.optimizer}, lr {tc.lr}, {tc.schedule} schedule",
        f"* device: {report['device']} x{report['device_count']}",
        "", "| figure | value |", "| --- | --- |",
        f"| validation loss | {report['val_loss']:.4f} nats/token |",
        f"| validation bits per byte | {report['val_bpb']:.4f} |",
        f"| final train loss | {report['final_train_loss']:.4f} |",
        f"| throughput | {report['tokens_per_s']:,.0f} tokens/s |",
        f"| model FLOPs per token | {report['flops_per_token'] / 1e6:.1f} MFLOP |",
        f"| MFU | {report['mfu']:.2%} of {report['peak_flops_per_device'] / 1e9:.1f} GFLOP/s measured peak |",
        f"| training time | {report['elapsed_s'] / 60:.1f} min |",
        f"| data preparation | {report['data_prep_s'] / 60:.1f} min |",
        f"| whole run | {report['wall_clock_s'] / 60:.1f} min |",
        f"| device-hours | {report['device_hours']:.4f} |",
        f"| cost | ${report['dollars']:.4f} at ${report['price_per_device_hour']}/device-hour |",
        f"| max expert-load violation (last step) | {report['max_violation'] or 0:.2f} |",
        *_post_lines(report), "", "![loss curve](loss.png)", "",
        "## Expert load on the last step (% of routed tokens per expert)", "",
        "| MoE layer | experts 0.. |", "| --- | --- |", *load_rows, "",
        "## Sample (greedy)", "", "```", report.get("sample", ""), "```", "",
        f"Checkpoint: `{report['final_checkpoint']}` (Hugging Face layout).", "",
    ]
    path = out / "report.md"
    if report.get("post"):
        lines += ["## Chat with the reasoning format (greedy, after GRPO)", "", "```",
                  str((report["post"]["grpo"]["after"].get("example") or {})), "```", ""]
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def speedrun_cmd(recipe: Literal["cpu", "gpu", "node"] = "cpu", out: str = "runs/speedrun", corpus: str = "stdlib",
                 minutes: float | None = None, steps: int | None = None, price_per_hour: float | None = None) -> int:
    """The whole pipeline: tokenizer, shards, pretraining, cold-start SFT, GRPO, report, checkpoint.
    Running it again resumes an interrupted run.

    Args:
        recipe: cpu: a 2-core machine in under 15 minutes; gpu: one GPU; node: 8 GPUs under torchrun
        out: run directory
        corpus: corpus source (default: the Python standard library)
        minutes: pretraining's minutes, trained by the clock (default: the recipe's)
        steps: a fixed number of pretraining steps instead of minutes
        price_per_hour: dollars per device-hour
    """
    try:
        speedrun(recipe, out=out, corpus=corpus, minutes=minutes, price_per_hour=price_per_hour, steps=steps)
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0

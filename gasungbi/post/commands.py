"""CLI: ``gasungbi sft``, ``gasungbi grpo``, ``gasungbi distill``, ``gasungbi eval-tasks``."""

from __future__ import annotations

import argparse
import dataclasses
import json

from gasungbi.errors import UserError


def _dataclass_flags(p: argparse.ArgumentParser, cls, help: dict[str, str], required: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` flag per dataclass field (booleans get --x/--no-x)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        text = f"{help.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            typ = type(f.default) if f.default is not None else (float if "price" in f.name else str)
            p.add_argument(flag, type=typ, default=f.default, required=f.name in required, help=text)


def _from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------------------------------------

def sft(args: argparse.Namespace) -> int:
    from gasungbi.train.commands import train_config_from_args
    from gasungbi.train.trainer import TrainConfig, train

    tc = train_config_from_args(args, TrainConfig(task="sft", out_dir="runs/sft", max_steps=200, lr=1e-3,
                                                  warmup_steps=10, eval_interval=50, ckpt_interval=100,
                                                  seq_len=512, batch_size=8))
    try:
        report = train(dataclasses.replace(tc, task="sft"))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"step {report['step']}: val loss {report['val_loss']:.4f} on assistant tokens; "
          f"checkpoint {report['checkpoint']}")
    return 0


def _sft_args(p: argparse.ArgumentParser) -> None:
    from gasungbi.train.commands import add_train_flags
    add_train_flags(p, skip=("task", "model"))


sft.add_args = _sft_args


GRPO_HELP = {
    "init_from": "checkpoint to improve (the initial policy and the KL reference)",
    "task": "gym task family (arithmetic, countdown, ...)", "difficulty": "task difficulty",
    "reasoning": "ask for <think>...</think><answer>...</answer>", "reward": "accuracy, format, accuracy+format, or module:function",
    "steps": "GRPO steps", "prompts_per_step": "prompts per step", "group_size": "completions per prompt (G)",
    "max_new_tokens": "longest completion", "temperature": "sampling temperature of rollouts", "lr": "AdamW learning rate",
    "clip_eps": "PPO clip epsilon", "beta": "KL weight (k3 estimator); 0 = no reference model",
    "updates": "optimizer steps per batch of rollouts", "variant": "grpo or dr_grpo",
    "eval_tasks": "held-out tasks for the before/after accuracy", "resume": "continue from the newest checkpoint",
}


def grpo_cmd(args: argparse.Namespace) -> int:
    from gasungbi.post.grpo import GRPOConfig, grpo
    try:
        r = grpo(_from_args(GRPOConfig, args))
    except ValueError as e:
        raise UserError(str(e)) from None
    b, a = r["before"], r["after"]
    print(f"held-out accuracy: {b['accuracy']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] -> "
          f"{a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] (n={a['n']}); checkpoint {r['checkpoint']}")
    return 0


def _grpo_args(p):
    from gasungbi.post.grpo import GRPOConfig
    _dataclass_flags(p, GRPOConfig, GRPO_HELP, required=("init_from",))


grpo_cmd.add_args = _grpo_args


def distill_cmd(args: argparse.Namespace) -> int:
    from gasungbi.post.distill import DistillConfig, distill
    try:
        r = distill(_from_args(DistillConfig, args))
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"kept {r['kept']} of {r['sampled']} teacher traces ({r['acceptance']:.0%}); "
          f"student checkpoint {r['student']['checkpoint']}")
    return 0


def _distill_args(p):
    from gasungbi.post.distill import DistillConfig
    _dataclass_flags(p, DistillConfig, {"teacher": "teacher checkpoint or OpenAI-compatible URL (http://host:port/v1)",
                                        "student": "student checkpoint (brings its tokenizer)"},
                     required=("teacher", "student"))


distill_cmd.add_args = _distill_args


def eval_tasks_cmd(args: argparse.Namespace) -> int:
    from gasungbi.eval.accuracy import evaluate_checkpoint
    try:
        r = evaluate_checkpoint(args.checkpoint, args.task, args.difficulty, n=args.n, k=args.k,
                                reasoning=args.reasoning, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        lo, hi = r["ci95"]
        print(f"{args.task} (difficulty {args.difficulty}), {r['n_tasks']} held-out tasks: pass@1 {r['pass@1']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]" + (f", pass@{args.k} {r[f'pass@{args.k}']:.3f}" if args.k > 1 else ""))
    return 0


def _eval_args(p):
    p.add_argument("checkpoint", help="a checkpoint directory")
    p.add_argument("--task", default="arithmetic", help="gym task family")
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--n", type=int, default=200, help="held-out tasks")
    p.add_argument("--k", type=int, default=1, help="pass@k (samples k at temperature 1 per task)")
    p.add_argument("--reasoning", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


eval_tasks_cmd.add_args = _eval_args

"""Sizing a run to a time budget: measure a step, then fit the steps (the schedule's horizon).

Used by ``gasungbi train --time-budget MINUTES`` and by the speedrun. A step is timed on random
tokens with a fresh model of the run's configuration (the first of ``steps`` timings is a warm-up
and dropped); a validation batch (a forward pass without gradients) is timed the same way, so the
validations the run will do are subtracted from the budget:

    budget = n x step_s + (n // eval_interval + 1) x eval_batches x eval_batch_s   solved for n

The time the run spent before the sizing (from the ``train`` command's start: imports, loading
data, building the model, the timings themselves) is taken off the budget first, and
:data:`TAIL_S` is kept back for the end. At the end of warmup the horizon is re-sized once from the
real steps' time (:func:`resize_to_budget`). Checkpoints and samples during the run are
not counted (a few seconds each at the sizes this fits).

Short budgets get their own defaults (:func:`short_budget_defaults`): what a few minutes of a CPU
buys is a few hundred small optimizer steps, not a few dozen large ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import torch

from gasungbi.config import ModelConfig
from gasungbi.train import distributed as dist


def measure_seconds(tc, model_config: ModelConfig, device: torch.device, steps: int = 3,
                    amp=None, batch_size: int | None = None) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per validation batch) of ``tc``'s settings for a model
    of ``model_config``: the best of ``steps`` - 1 timings each. ``batch_size``: sequences per
    micro-batch (default ``tc.batch_size``; under data parallelism, one process's share)."""
    from gasungbi.model.transformer import build_model
    from gasungbi.train.objective import Objective
    from gasungbi.train.optim import build_optimizers

    amp = amp if amp is not None else contextlib.nullcontext()
    model = build_model(model_config, device=device, seed=0).train()
    obj = Objective(model, tc.mtp_weight)
    opt = build_optimizers(model, tc.optimizer, tc.lr)
    x = torch.randint(0, model_config.vocab_size, (batch_size or tc.batch_size, tc.seq_len), device=device)

    def timed(fn) -> float:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times[1:]) if len(times) > 1 else times[0]

    def train_step():
        for _ in range(tc.grad_accum):
            with amp:
                loss = obj(x, x)["loss"]
            loss.backward()
        for o in opt:
            o.step()
            o.zero_grad()

    def eval_batch():
        with torch.no_grad(), amp:
            obj(x, x)

    return timed(train_step), timed(eval_batch)


def measure_step_seconds(tc, vocab_size: int, steps: int = 5) -> float:
    """Seconds per optimizer step of ``tc``'s preset model on random tokens (best of ``steps`` - 1:
    with 3 steps, one measurement on this machine came out at 2.26 s for a model that then trained
    at 1.3-1.7 s/step, and the speedrun's pretraining used 70% of its budget)."""
    from gasungbi.infer.placement import resolve_device

    return measure_seconds(tc, tc.model_config(vocab_size), resolve_device(tc.device), steps)[0]


def steps_for_budget(seconds: float, step_s: float, eval_batch_s: float, eval_interval: int,
                     eval_batches: int) -> int:
    """The most optimizer steps (>= 1) whose training and validations fit ``seconds``."""
    per_eval = eval_batches * eval_batch_s
    per_step = step_s + (per_eval / eval_interval if eval_interval else 0.0)
    return max(1, int((seconds - per_eval) / per_step))  # - per_eval: the validation at the end


TAIL_S = 1.0
"""Seconds kept back for what follows the last step: the final checkpoint, a sample and the report
(0.6-0.9 s for ``cpu-tiny`` on the 2-core machine this was written on; the plot's import is paid
during setup instead). The budget counts from the ``train`` command's start, imports included."""

SHORT_BUDGET_MINUTES = 5.0
"""At or below this budget, :func:`short_budget_defaults` applies."""

SHORT_BUDGET = dict(batch_size=8, seq_len=128, lr=6e-3, mtp_weight=0.0, eval_interval=0, eval_batches=4)
"""The short-budget recipe: 8 x 128 tokens per step (4x the steps of 16 x 256 in the same time; early in
training the useful batch is small), a higher peak learning rate for the short schedule, no MTP
(its extra depth pays at scale, V3 Sec. 2.2, not in a minute), one small validation at the end.
Chosen on tiny Shakespeare at a ~1 minute budget (``benchmarks/cpu_minute.py``)."""


def short_budget_defaults(tc, defaults) -> tuple[object, dict]:
    """``tc`` with :data:`SHORT_BUDGET` for the fields still at their ``defaults`` when its time budget
    is at most :data:`SHORT_BUDGET_MINUTES`; and the fields changed. A field set to anything else
    (a flag, a config file) is kept."""
    if tc.time_budget is None or tc.time_budget > SHORT_BUDGET_MINUTES:
        return tc, {}
    changed = {k: v for k, v in SHORT_BUDGET.items() if getattr(tc, k) == getattr(defaults, k) != v}
    return dataclasses.replace(tc, **changed), changed


def size_to_budget(tc, cfg: ModelConfig, info, amp, state: dict | None,
                    spent: float = 0.0):
    """``tc`` with max_steps sized to ``tc.time_budget`` minutes less the ``spent`` seconds of setup
    and the sizing's own timings (the warmup capped at a fifth of the steps), and the sizing's
    record; a resumed run keeps the steps it was sized to."""
    if state is not None:
        sized = json.loads(state["train_config"])
        return (dataclasses.replace(tc, max_steps=sized["max_steps"], warmup_steps=sized["warmup_steps"]),
                {**(state.get("time_budget") or {}), "resumed": True})
    t0 = time.perf_counter()
    if info.is_main:  # the plot's import (~1 s) is paid now, inside the measured setup
        from gasungbi.eval.plots import preload
        preload()
    step_s, eval_s = measure_seconds(tc, cfg, info.device, amp=amp, batch_size=tc.batch_size // info.world_size)
    if info.enabled:  # every rank must run the same number of steps: the mean of their timings
        t = dist.all_reduce_sum(torch.tensor([step_s, eval_s], device=info.device)) / info.world_size
        step_s, eval_s = t.tolist()
    spent += time.perf_counter() - t0
    seconds = tc.time_budget * 60 - spent - TAIL_S
    steps = steps_for_budget(seconds, step_s, eval_s, tc.eval_interval, tc.eval_batches)
    warmup = min(tc.warmup_steps, max(1, steps // 5))
    evals = (steps // tc.eval_interval if tc.eval_interval else 0) + 1
    record = {"minutes": tc.time_budget, "setup_s": spent, "tail_s": TAIL_S, "step_s": step_s, "eval_batch_s": eval_s,
              "max_steps": steps, "warmup_steps": warmup,
              "validation_s_estimate": round(evals * tc.eval_batches * eval_s, 2)}
    if info.is_main:
        print(f"time budget {tc.time_budget:g} min: {spent:.1f} s of setup, measured {step_s:.3f} s/step and "
              f"{eval_s:.3f} s per validation batch: {steps} steps ({record['validation_s_estimate']:.0f} s of "
              f"it validation), warmup {warmup}")
    return dataclasses.replace(tc, max_steps=steps, warmup_steps=warmup), record


def resize_to_budget(tc, budget: dict, step_s: float, step: int, spent: float, info) -> tuple[object, int]:
    """Once, at the end of warmup: the horizon re-sized from the real steps' time (``step_s``, the
    mean after the first step; the ranks' mean under torchrun), since a step timed on random tokens
    before training misses the data, logging and balancing updates, and a machine that slows under
    load. At the end of warmup the learning rate is the peak for any
    horizon, so the schedule stays continuous. Recorded in ``budget["resized"]``; a resumed run keeps
    its sizing."""
    if info.enabled:
        step_s = dist.all_reduce_sum(torch.tensor([step_s], device=info.device)).item() / info.world_size
    total = step + steps_for_budget(tc.time_budget * 60 - spent - TAIL_S, step_s, budget["eval_batch_s"], tc.eval_interval,
                                    tc.eval_batches)
    budget["resized"] = {"at_step": step, "step_s": step_s, "max_steps": total}
    if info.is_main:
        print(f"\ntime budget: the first {step} steps ran at {step_s:.3f} s/step (measured before: "
              f"{budget['step_s']:.3f}): {total} steps instead of {tc.max_steps}")
    tc = dataclasses.replace(tc, max_steps=total)
    return tc, min(total, tc.stop_after or total)

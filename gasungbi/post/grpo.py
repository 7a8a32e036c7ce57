"""GRPO: reinforcement learning with verifiable rewards (DeepSeekMath Sec. 4.1; DeepSeek-R1 Sec. 2.2).

Each step: P prompts from the reasoning gym, G sampled completions each (a group), a reward per
completion from a program (answer accuracy, R1's format reward, or a user callable); then

    A_i = (r_i - mean(r)) / (std(r) + 1e-4)                 group-normalized advantage (GRPO)
    A_i =  r_i - mean(r)                                     Dr. GRPO (Liu et al. 2025): no std
    ratio_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)   every pi at the sampling temperature (logits / T)
    L = -1/G sum_i 1/|o_i| sum_t [ min(ratio_t A_i, clip(ratio_t, 1-eps, 1+eps) A_i) - beta KL_t ]
    KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1       the unbiased k3 estimator (Schulman 2020)

The k3 term's value estimates KL(pi_theta || pi_ref) on samples of pi_theta, but its gradient, with
the samples held fixed, is that of KL(pi_ref || pi_theta): grad E[k3] = E[(1 - pi_ref/pi_theta)
grad log pi_theta] = -sum pi_ref grad log pi_theta. ``kl_estimator="k3_corrected"`` multiplies k3 by
the importance ratio pi_theta/pi_old (not detached), TRL's ``use_bias_correction_kl`` (after
DeepSeek-V3.2): E_old[ratio k3] = KL(pi_theta || pi_ref) in value, and its gradient is that of the same KL,
also when pi_theta has moved away from pi_old during ``updates`` > 1.

Dr. GRPO replaces 1/|o_i| by one constant (1 / max_new_tokens), removing the length bias.
``updates`` optimizer steps reuse each batch of rollouts (pi_old is the policy that sampled them;
with one update the ratio is 1 and the clip is inactive, as in R1's setting).

Deviations, stated: the reference model is the initial checkpoint and is never refreshed; the
routing bias of MoE layers is frozen during RL (no balancing updates); rollouts use the same
weights in fp32 (no separate inference engine), so pi_old is exact. ``precision``: ``bf16`` runs the
log-probability forwards (pi_old and the update) under bf16 autocast; ``fp8`` swaps in DeepSeek-V3's
block-scaled FP8 GEMMs (:mod:`gasungbi.train.fp8`) for rollouts and updates alike.

Under ``torchrun`` each of the W processes takes P/W of a step's prompts (whole groups, so the
advantages are unchanged), samples their completions and computes their loss; DDP averages the
gradients, which is the one-process gradient of the same P groups (the loss is a mean over
completions). ``expert_parallel`` K shards the routed experts over K ranks (the pass of
:mod:`gasungbi.train.expert_parallel`): rollouts, log-probabilities and updates all exchange tokens,
so the K ranks of a group generate together until all their rows are done. Held-out evaluation
runs on rank 0 alone (the experts gathered there); checkpoints are sharded
(:mod:`gasungbi.train.sharded`) and the final one also has the Hugging Face layout.

``lora_rank`` R > 0 trains LoRA adapters on the frozen policy (``quant``: held in int8/int4, QLoRA;
:mod:`gasungbi.train.lora`); the KL reference is then the same model with its adapters turned off,
so no second copy of the weights is loaded (as TRL does with PEFT), and checkpoints hold the adapters.

``time_budget`` (minutes) bounds the whole run, its held-out evaluations included, by the clock
(:class:`gasungbi.train.budget.Budget`): before each step the run stops if that step and what
follows the last one (the final evaluation, timed by the first, and the checkpoint) would overrun
it; the report's ``steps`` is then below ``planned_steps``. The learning rate is constant, so a
shortened run is the first steps of the planned one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from gasungbi.data.conventions import Conventions
from gasungbi.data.tokenizer import PAD_ID
from gasungbi.infer.generate import generate
from gasungbi.infer.sampling import SamplingParams
from gasungbi.interop.hf import load_model
from gasungbi.eval.accuracy import evaluate_model
from gasungbi.gym.rewards import load_reward
from gasungbi.gym.tasks import get_family, make_split, render_task_prompt
from gasungbi.model.accounting import count_params
from gasungbi.train import distributed as dist
from gasungbi.train import lora
from gasungbi.train.budget import Budget, save_seconds_estimate
from gasungbi.train.optim import build_optimizers
from gasungbi.train.run import Run


@dataclass
class GRPOConfig:
    """A GRPO run. Defaults suit a small model on a CPU."""

    init_from: str = ""  # the checkpoint to improve (SFT'd or pretrained): the initial policy and the KL reference
    out_dir: str = "runs/grpo"  # run directory: checkpoints, metrics.jsonl, report.json
    task: str = "arithmetic"  # a gym task family (arithmetic, addition, countdown, sort)
    difficulty: int = 2  # task difficulty
    reasoning: bool = True  # ask for <think>...</think><answer>...</answer>
    reward: str = "accuracy+format"  # accuracy, format, accuracy+format, or module:function
    steps: int = 40  # GRPO steps
    time_budget: float | None = None  # minutes for the whole run, its evaluations included: stop at the step boundary where one more step and the final evaluation would not fit (the report says so)
    prompts_per_step: int = 8  # P, prompts per step
    group_size: int = 8  # G, completions per prompt
    max_new_tokens: int = 48  # longest completion
    temperature: float = 1.0  # sampling temperature of the rollouts
    lr: float = 5e-5  # AdamW learning rate
    clip_eps: float = 0.2  # PPO clip epsilon
    beta: float = 0.0  # KL weight (k3 estimator); 0 drops the reference model
    kl_estimator: Literal["k3", "k3_corrected"] = "k3"  # k3: gradient of KL(ref || policy); k3_corrected: k3 x ratio, gradient of KL(policy || ref) (TRL's use_bias_correction_kl)
    updates: int = 1  # optimizer steps per batch of rollouts
    variant: Literal["grpo", "dr_grpo"] = "grpo"  # dr_grpo: Dr. GRPO (no std normalization, constant length norm)
    grad_clip: float = 1.0  # gradient norm clip
    eval_tasks: int = 100  # held-out tasks for the before/after accuracy
    eval_interval: int = 0  # steps between held-out evaluations (0: only before and after)
    ckpt_interval: int = 20  # steps between checkpoints
    keep_checkpoints: int = 2  # how many checkpoints to keep
    seed: int = 0  # seed of the task draw and the sampler
    device: str = "cpu"  # cpu, cuda or cuda:N
    price_per_hour: float | None = None  # dollars per device-hour
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # replace the run in out_dir (without this or --resume, an existing run is refused)
    progress: bool = True  # show a progress bar
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"  # bf16: autocast for the policy's log-probabilities; fp8: DeepSeek-V3's block-scaled FP8 GEMMs (emulated off CUDA)
    adam_moments: Literal["fp32", "bf16"] = "fp32"  # dtype of AdamW's moments (DeepSeek-V3 keeps them in bf16)
    expert_parallel: int = 1  # under torchrun: shard the routed experts over this many ranks (EP; DDP over all ranks for the rest)
    # LoRA / QLoRA (train/lora.py): adapters on the frozen init_from
    lora_rank: int = 0  # rank r of LoRA adapters (0: train every weight instead)
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # module-name suffixes that get adapters (PEFT's target_modules)
    quant: Literal["int8", "int4"] | None = None  # QLoRA: hold the frozen base in int8/int4 (the adapters stay fp32)

    def validate(self) -> None:
        if not self.init_from:
            raise ValueError("grpo needs init_from, the checkpoint to improve")
        if self.variant not in ("grpo", "dr_grpo"):
            raise ValueError(f"variant={self.variant!r}; choose grpo or dr_grpo")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_estimator not in ("k3", "k3_corrected"):
            raise ValueError(f"kl_estimator={self.kl_estimator!r}; choose k3 or k3_corrected")
        if self.precision not in ("fp32", "bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}; choose fp32, bf16 or fp8")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be > 0 minutes, got {self.time_budget}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (GRPO compares sampled completions), got {self.temperature}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages compare completions within a group")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.prompts_per_step % world:
            raise ValueError(f"prompts_per_step={self.prompts_per_step} must be divisible by the {world} processes "
                             "(each takes whole groups)")
        if self.expert_parallel < 1 or world % self.expert_parallel:
            raise ValueError(f"expert_parallel={self.expert_parallel} must divide the {world} processes"
                             + (" (launch with torchrun --nproc_per_node=N, N a multiple of it)" if world == 1 else ""))
        if self.expert_parallel > 1 and self.precision == "fp8":
            raise ValueError("expert_parallel > 1 works without --precision fp8 (for now)")
        lora.check_config(self, _raise)
        get_family(self.task)


def _raise(message: str):
    raise ValueError(message)


def group_advantages(rewards: torch.Tensor, variant: str = "grpo") -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G], normalized within each group."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if variant == "dr_grpo":
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + 1e-4)


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of each completion given its prompt: (logp [N, L], mask [N, L]),
    L = the longest completion. Sequences are right-padded (causal attention ignores the padding).
    ``temperature``: the rollouts' sampling temperature; the logits are divided by it (as TRL's
    GRPOTrainer does), so the ratio and the KL are those of the distribution that was sampled."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(map(len, seqs))
    L = max(1, max(map(len, completions)))
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    ids = ids.to(device)
    logp_all = torch.log_softmax(model(ids).float() / temperature, dim=-1)  # (N, T, V)
    logp = torch.zeros(len(seqs), L, device=device)
    mask = torch.zeros(len(seqs), L, device=device)
    rows, cols, targets, slots = [], [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        for j, tok in enumerate(c):
            rows.append(i)
            cols.append(len(p) + j - 1)  # the logits that predict completion token j
            targets.append(tok)
            slots.append(j)
    if rows:
        r = torch.tensor(rows, device=device)
        picked = logp_all[r, torch.tensor(cols, device=device), torch.tensor(targets, device=device)]
        logp = logp.index_put((r, torch.tensor(slots, device=device)), picked)
        mask[r, torch.tensor(slots, device=device)] = 1.0
    return logp, mask


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, mask: torch.Tensor,
              adv: torch.Tensor, clip_eps: float, beta: float, variant: str, max_new_tokens: int,
              kl_estimator: str = "k3") -> tuple[torch.Tensor, dict]:
    """The clipped surrogate with the k3 KL penalty; inputs are [N, L] (adv [N]). ``kl_estimator``:
    ``k3`` (its gradient is that of KL(ref || policy)) or ``k3_corrected`` (k3 x ratio: value and
    gradient of KL(policy || ref)); see the module docstring."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if kl_estimator == "k3_corrected":
            kl = kl * ratio
        per_token = surrogate - beta * kl
    if variant == "dr_grpo":
        loss = -(per_token * mask).sum() / (mask.shape[0] * max_new_tokens)
    else:
        loss = -((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    n = mask.sum().clamp(min=1)
    stats = {"kl": ((kl * mask).sum() / n).item(),
             "clip_frac": ((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n).item()}
    return loss, stats


def evaluate_policy(model, conv, cfg: GRPOConfig, n: int) -> dict:
    """Greedy (pass@1, fixed) accuracy on the gym's held-out test split, with its 95% interval."""
    r = evaluate_model(model, conv, cfg.task, cfg.difficulty, n, reasoning=cfg.reasoning,
                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    return {"accuracy": r["pass@1"], "ci95": list(r["ci95"]), "n": r["n_tasks"], "example": r.get("example"),
            "per_task": r["per_task"]}


class Policy(nn.Module):
    """The policy as the one module DDP wraps: ``forward(ids)`` -> logits. Its state keys are those
    of the trainer's objective (``model.*``), so sharded checkpoints share one layout."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


def grpo(cfg: GRPOConfig, started: float | None = None) -> dict[str, Any]:
    """Run (or resume) GRPO, in one process or under torchrun; returns the report (also
    out_dir/report.json). ``started``: the ``time.perf_counter()`` the time budget counts from
    (default: this call)."""
    cfg.validate()
    info = dist.setup(cfg.device)
    try:
        return GRPO(cfg, info, started if started is not None else time.perf_counter()).fit()
    finally:
        dist.teardown()


class GRPO:
    """One GRPO run: the policy, its reference and optimizer on a :class:`Run`, the task pool, and
    the loop of rollouts and updates."""

    FIGURES = ("loss", "reward", "accuracy", "zero_variance_groups", "response_length", "kl", "clip_frac")
    """A step's figures, means over all ranks (each rank's mean over its equal share of completions)."""

    def __init__(self, cfg: GRPOConfig, info: dist.DistInfo, started: float):
        self.cfg, self.info = cfg, info
        self.conv = Conventions.load(cfg.init_from)  # the checkpoint's chat template and stops (a bad path fails here)
        self.run = Run(cfg.out_dir, info, resume=cfg.resume, overwrite=cfg.overwrite, tokenizer=cfg.init_from,
                       keep=cfg.keep_checkpoints, name="grpo", progress=cfg.progress, init_from=cfg.init_from)
        device = info.device
        self.lora = lora.spec_of(cfg)
        if self.lora is not None:
            self.model = self.run.model(lambda: lora.adapted_model(self.lora, device, cfg.seed), adapters=True)
        else:
            self.model = self.run.model(lambda: load_model(cfg.init_from, device=device, dtype=torch.float32))
        self.reference = (load_model(cfg.init_from, device=device, dtype=torch.float32)
                          if cfg.beta > 0 and self.lora is None else None)
        if cfg.precision == "fp8":
            from gasungbi.train.fp8 import apply_fp8
            apply_fp8(self.model)
        self.amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else contextlib.nullcontext())
        self.model.model.mtp.requires_grad_(False)  # no GRPO loss reaches the MTP modules (DDP needs every trained parameter used)
        self.policy = Policy(self.model)
        self.wrapped = self.run.layout(self.policy, cfg.expert_parallel, "ddp")
        self.policy.train()
        self.opt = build_optimizers(self.model, "adamw", cfg.lr, weight_decay=0.0, moments=cfg.adam_moments)[0]
        self.run.restore([self.opt])
        self.reward_fn, self.accuracy_fn = load_reward(cfg.reward), load_reward("accuracy")
        self.pool = make_split(cfg.task, max(1000, cfg.steps * cfg.prompts_per_step), cfg.difficulty, seed=cfg.seed,
                               split="train")
        n_act = count_params(self.model.config).activated
        # per generated token: ~2N to sample it, 2N for pi_old, (2N for pi_ref), 6N x updates to train (LoRA: 4N,
        # no weight gradients for the frozen base)
        flops_per_token = n_act * (4 + (2 if cfg.beta > 0 else 0) + (4 if self.lora else 6) * cfg.updates)
        self.meter = self.run.start_meter(flops_per_token, torch.float32, cfg.price_per_hour)
        self.budget = self._budget(started)
        if self.run.state:
            self.before = self.run.state["before"]
        else:
            t = time.perf_counter()
            self.before = {**self.held_out(), "elapsed_s": round(time.perf_counter() - t, 2)}
        self.budget.measure("evaluation", self.before["elapsed_s"])  # the final one is as long as the first

    def _budget(self, started: float) -> Budget:
        info, saved = self.info, (self.run.state or {}).get("budget") or {}
        reduce = None
        if info.enabled:
            def reduce(values: list[float]) -> list[float]:
                return dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=info.device)).tolist()
        budget = Budget(self.cfg.time_budget * 60 if self.cfg.time_budget is not None else None, self.cfg.steps,
                        started, before=saved.get("clock", 0.0), reduce=reduce, world=info.world_size)
        budget.load_state_dict(saved)
        weights = sum(p.numel() * p.element_size() for p in lora.trained_parameters(self.model))
        budget.estimate("checkpoint", save_seconds_estimate(3 * weights))  # weights and AdamW's two moments
        return budget

    def held_out(self) -> dict:
        """Greedy accuracy on the held-out tasks (collective under torchrun): see :meth:`evaluate`."""
        return self.evaluate(self.run.whole_model())

    def evaluate(self, whole) -> dict:
        """Greedy accuracy on the held-out tasks of ``whole`` (:meth:`Run.whole_model`): rank 0
        evaluates (the replicas are equal; with EP, on the gathered experts), all get it."""
        res = [evaluate_policy(whole.to(self.info.device).eval(), self.conv, self.cfg, self.cfg.eval_tasks)
               if self.info.is_main else None]
        self.policy.train()
        if self.info.enabled:
            torch.distributed.broadcast_object_list(res, src=0)
        return res[0]

    def fit(self) -> dict[str, Any]:
        cfg, run, budget = self.cfg, self.run, self.budget
        bar = run.progress(cfg.steps)
        done = run.start_step
        for step in range(run.start_step, cfg.steps):
            if budget.out_of_time(step, self._due_after(step + 1)):
                break
            started = budget.step_started()
            row = self.step(step)
            budget.step_done(started)
            run.log(row)
            bar.update(1)
            bar.set_postfix_str(f"reward {row['reward']:.2f} | acc {row['accuracy']:.2f} | "
                                f"len {row['response_length']:.0f} | kl {row['kl']:.3f}")
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.steps:
                t = time.perf_counter()
                run.history.append({"step": step + 1, "eval": self.held_out()})
                budget.measure("evaluation", time.perf_counter() - t)
            if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < cfg.steps:
                t = time.perf_counter()
                self.save(step + 1)
                budget.measure("checkpoint", time.perf_counter() - t)
            done = step + 1
        bar.close()
        return self.finish(done)

    def _due_after(self, step: int) -> float:
        """Seconds of the intervals' work due after step ``step`` (an evaluation, a checkpoint)."""
        cfg, tail = self.cfg, self.budget.tail
        due = tail.get("evaluation", 0.0) if cfg.eval_interval and step % cfg.eval_interval == 0 else 0.0
        return due + (tail.get("checkpoint", 0.0) if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 else 0.0)

    def rollouts(self, step: int) -> tuple[list, list[list[int]], list[list[int]], list[str]]:
        """This rank's tasks of ``step`` (whole groups), their prompts repeated ``group_size``
        times, the sampled completions (with the stop token where one ended them) and their texts."""
        cfg, info = self.cfg, self.info
        local = cfg.prompts_per_step // info.world_size
        first = step * cfg.prompts_per_step + info.rank * local
        batch = [self.pool[(first + i) % len(self.pool)] for i in range(local)]
        prompts = [self.conv.chat_ids(render_task_prompt(t, cfg.reasoning), content_as_text=False) for t in batch]
        group_prompts = [p for p in prompts for _ in range(cfg.group_size)]
        self.model.eval()
        seed = cfg.seed * 1_000_003 + step * info.world_size + info.rank  # one process: seed * 1_000_003 + step
        stop_ids = self.conv.stop_ids
        outs = generate(self.model, group_prompts, max_new_tokens=cfg.max_new_tokens, tokenizer=self.conv.tokenizer,
                        stop_tokens=stop_ids, sampling=SamplingParams(temperature=cfg.temperature, seed=seed),
                        group=self.run.ep_group)
        completions = [o.tokens + ([stop_ids[0]] if o.finish_reason == "stop" else []) for o in outs]
        return batch, group_prompts, completions, [o.text or "" for o in outs]

    def step(self, step: int) -> dict:
        """Sample the groups, reward them, update the policy ``cfg.updates`` times; the step's row."""
        cfg, G = self.cfg, self.cfg.group_size
        batch, group_prompts, completions, texts = self.rollouts(step)
        rewards = torch.tensor([self.reward_fn(batch[i // G], texts[i]) for i in range(len(texts))],
                               device=self.info.device).view(len(batch), G)
        adv = group_advantages(rewards, cfg.variant).flatten()
        with torch.no_grad():
            with self.amp:
                old_logp, mask = completion_logprobs(self.model, group_prompts, completions, cfg.temperature)
            ref_logp = self.reference_logprobs(group_prompts, completions)
        self.policy.train()
        for _ in range(cfg.updates):
            with self.amp:
                logp, _ = completion_logprobs(self.wrapped, group_prompts, completions, cfg.temperature)
            loss, stats = grpo_loss(logp, old_logp, ref_logp, mask, adv, cfg.clip_eps, cfg.beta, cfg.variant,
                                    cfg.max_new_tokens, cfg.kl_estimator)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.run.clip(cfg.grad_clip)
            self.opt.step()
        accuracy = sum(self.accuracy_fn(batch[i // G], texts[i]) for i in range(len(texts))) / len(texts)
        figures = torch.tensor([loss.item(), rewards.mean().item(), accuracy, (rewards.std(dim=1) == 0).float().mean().item(),
                                mask.sum(dim=1).mean().item(), stats["kl"], stats["clip_frac"]],
                               dtype=torch.float64, device=self.info.device)
        tokens = torch.tensor([mask.sum().item()], dtype=torch.float64, device=self.info.device)
        if self.info.enabled:
            figures = dist.all_reduce_sum(figures) / self.info.world_size
            dist.all_reduce_sum(tokens)
        self.meter.update(int(tokens.item()))
        return {"step": step + 1, **dict(zip(self.FIGURES, figures.tolist())), "dollars": round(self.meter.dollars, 6),
                "elapsed_s": round(self.meter.elapsed, 2), "sample": texts[0][:200]}

    def reference_logprobs(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor | None:
        """The KL reference's log-probabilities of the completions (None without the KL term): the
        initial checkpoint's, or with LoRA the policy's with its adapters off."""
        if self.cfg.beta <= 0:
            return None
        if self.lora is not None:
            with lora.adapters_off(self.model):
                return completion_logprobs(self.model, prompts, completions, self.cfg.temperature)[0]
        return completion_logprobs(self.reference, prompts, completions, self.cfg.temperature)[0]

    def save(self, step: int, whole=None):
        state = {"grpo_config": json.dumps(dataclasses.asdict(self.cfg)), "before": self.before,
                 "budget": self.budget.state_dict()}
        return self.run.save(step, state, whole)

    def finish(self, done: int) -> dict[str, Any]:
        """The held-out evaluation after training, the final checkpoint, the report."""
        cfg, info = self.cfg, self.info
        whole = self.run.whole_model()
        after = self.evaluate(whole)
        path = self.save(done, whole)
        if done < cfg.steps and info.is_main:
            print(f"grpo: stopped after {done} of {cfg.steps} steps: the {cfg.time_budget:g}-minute budget was spent")
        report = {"task": cfg.task, "difficulty": cfg.difficulty, "steps": done, "planned_steps": cfg.steps,
                  "time_budget": cfg.time_budget, "budget": self.budget.record(), "before": self.before, "after": after,
                  "improved_beyond_ci": after["accuracy"] > self.before["ci95"][1], "checkpoint": str(path),
                  **self.meter.summary(), "device": self.run.device_name, "device_count": info.world_size}
        return self.run.finish(report)

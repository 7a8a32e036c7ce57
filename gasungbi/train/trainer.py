"""The training loop of pretraining and SFT: :func:`train` runs a :class:`Trainer`.

The loop's data is pluggable (``data``): token shards for pretraining (:class:`TokenData`), chats
for SFT (:class:`gasungbi.post.sft.SFTData`). What every run does around its steps (claim the
directory, resume, lay the model out, meter, log, save) is :class:`gasungbi.train.run.Run`'s.

Per optimizer step: ``grad_accum`` micro-batches of next-token + MTP (+ optional balance) loss,
gradient clipping, the optimizer step(s) at the scheduled learning rate, then the
auxiliary-loss-free expert-bias update. At intervals: validation loss and bits per byte, sample
text, checkpoints. SIGINT/SIGTERM finish the current step, save a checkpoint and return cleanly;
``resume=True`` continues from the newest checkpoint and reproduces the uninterrupted run exactly
on CPU (same weights, bit for bit).

Precision (``precision``): ``auto`` is fp32 on CPU (bf16 autocast is slow on CPUs without
AVX512-BF16 or AMX) and bf16 autocast with fp32 master weights on CUDA; ``fp32`` and ``bf16`` force one;
``fp8`` swaps in DeepSeek-V3's block-scaled FP8 GEMMs (:mod:`gasungbi.train.fp8`) after the model is
built and before the optimizer, with the rest as ``auto``. ``adam_moments=bf16`` keeps AdamW's
moments in BF16 (V3 Sec. 3.3.3).

``lora_rank`` R > 0 trains LoRA adapters on the frozen ``init_from`` (``quant``: held in int8/int4,
QLoRA) instead of every weight (:mod:`gasungbi.train.lora`); checkpoints then hold the adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from gasungbi.config import ModelConfig, read_config, to_hf_config
from gasungbi.presets import PRESETS, get_preset
from gasungbi.data.shards import TokenLoader, load_manifest
from gasungbi.eval.perplexity import evaluate
from gasungbi.model.accounting import count_params, training_flops_per_token
from gasungbi.model.transformer import Transformer, build_model
from gasungbi.train import distributed as dist
from gasungbi.train import lora
from gasungbi.train.budget import Budget, save_seconds_estimate
from gasungbi.train.meter import device_peak
from gasungbi.train.objective import Objective, update_expert_bias
from gasungbi.train.optim import build_optimizers, lr_multiplier
from gasungbi.train.run import Run, StopFlag


@dataclass
class TrainConfig:
    """Everything a pretraining or SFT run needs. CLI flags and ``--config FILE`` map onto these fields."""

    data: str = ""  # pretraining: a shard directory made by `gasungbi prepare`; sft: a JSONL of conversations
    out_dir: str = "runs/train"  # run directory: checkpoints, metrics.jsonl, loss.png, report.json
    init_from: str | None = None  # a Hugging Face checkpoint to start from (with its tokenizer)
    model: str = "cpu-tiny"  # model preset (see `gasungbi params`), when not init_from; vocab_size follows the tokenizer
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model config fields to change (CLI: --set)
    # batch: tokens per optimizer step = batch_size x seq_len x grad_accum (global, all ranks)
    batch_size: int = 16  # sequences per micro-batch, all processes together
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps (the schedule's horizon); default 1000, or none with a time budget
    time_budget: float | None = None  # minutes for the whole command: the schedule follows the clock and training stops in time for its final validation and checkpoint (train/budget.py); with --max-steps, whichever comes first
    # optimizer and schedule
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for hidden matrices + AdamW for the rest
    lr: float = 3e-3  # AdamW peak learning rate
    muon_lr: float = 0.02  # Muon peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip
    warmup_steps: int = 50  # linear warmup steps
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup-stable-decay
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    decay_frac: float = 0.2  # wsd: fraction of the steps spent decaying
    # DeepSeek-V3 objectives (V3 Sec. 4.2 used gamma 0.001, alpha 0.0001, lambda 0.3 then 0.1)
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing (0 disables)
    balance_alpha: float = 0.0  # alpha of the sequence-wise balance loss (0 disables)
    mtp_weight: float = 0.3  # lambda, the weight of the multi-token-prediction loss
    # evaluation, samples, checkpoints, logs
    eval_interval: int = 200  # steps between validations (0: only at the end)
    eval_batches: int = 20  # validation batches per evaluation
    sample_interval: int = 0  # steps between sample generations (0: only at the end)
    sample_prompt: str = "def "  # prompt of the sample generations
    sample_tokens: int = 48  # tokens per sample
    ckpt_interval: int = 200  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2  # how many checkpoints to keep
    log_interval: int = 10  # steps between metrics.jsonl rows
    tensorboard: bool = False  # also log to out_dir/tb (needs the tensorboard package)
    progress: bool = True  # show a progress bar
    # hardware
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    compile: bool = False  # torch.compile the training step
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp8: DeepSeek-V3's block-scaled FP8 GEMMs (emulated off CUDA)
    adam_moments: Literal["fp32", "bf16"] = "fp32"  # dtype of AdamW's moments (DeepSeek-V3 keeps them in bf16)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: DDP, or FSDP2 (fully_shard)
    expert_parallel: int = 1  # under torchrun: shard the routed experts over this many ranks (EP; the rest is --parallel over all ranks)
    price_per_hour: float | None = None  # dollars per device-hour (default: the catalog's, or 0.05 on CPU)
    seed: int = 1337  # seed of initialization and data order
    resume: bool = False  # continue from the newest checkpoint in out_dir
    overwrite: bool = False  # replace the run in out_dir (without this or --resume, an existing run is refused)
    stop_after: int | None = None  # stop (with a checkpoint) after this step, keeping the max_steps schedule
    # LoRA / QLoRA (train/lora.py): adapters on the frozen init_from
    lora_rank: int = 0  # rank r of LoRA adapters (0: train every weight instead)
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS  # module-name suffixes that get adapters (PEFT's target_modules)
    quant: Literal["int8", "int4"] | None = None  # QLoRA: hold the frozen base in int8/int4 (the adapters stay fp32)

    def model_config(self, vocab_size: int) -> ModelConfig:
        cfg = get_preset(self.model).replace(**self.model_overrides)
        if cfg.vocab_size != vocab_size:
            cfg = cfg.replace(vocab_size=vocab_size)
        return cfg

    @property
    def step_limit(self) -> int | None:
        """``max_steps``, or its default: 1000 steps without a time budget, none with one."""
        if self.max_steps is not None:
            return self.max_steps
        return None if self.time_budget is not None else 1000

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"invalid training config: {msg}")
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "muon"):
            bad(f"optimizer={self.optimizer!r}; choose adamw or muon")
        if self.schedule not in ("cosine", "wsd"):
            bad(f"schedule={self.schedule!r}; choose cosine or wsd")
        if self.precision not in ("auto", "fp32", "bf16", "fp8"):
            bad(f"precision={self.precision!r}; choose auto, fp32, bf16 or fp8")
        if self.adam_moments not in ("fp32", "bf16"):
            bad(f"adam_moments={self.adam_moments!r}; choose fp32 or bf16")
        if self.parallel not in ("ddp", "fsdp"):
            bad(f"parallel={self.parallel!r}; choose ddp or fsdp")
        if self.time_budget is not None and self.time_budget <= 0:
            bad(f"time_budget must be > 0 minutes, got {self.time_budget}")
        if self.expert_parallel < 1:
            bad(f"expert_parallel must be >= 1, got {self.expert_parallel}")
        if self.expert_parallel > 1 and (self.precision == "fp8" or self.compile):
            bad("expert_parallel > 1 works without --precision fp8 and --compile (for now)")
        if not self.data:
            bad("data (a shard directory made by `gasungbi prepare`, or a JSONL for sft) is required")
        if self.resume and self.overwrite:
            bad("resume continues the run in out_dir and overwrite replaces it: choose one")
        if not self.init_from and self.model not in PRESETS:
            bad(f"model={self.model!r} is not a preset; choose one of: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown := sorted(set(self.model_overrides) - fields):
            bad(f"model_overrides (--set) {', '.join(unknown)}: not a field of the model config")
        if self.model_overrides and self.init_from:
            bad("model_overrides (--set) change a preset's config; the model of init_from is the checkpoint's")
        lora.check_config(self, bad)


FINISH_S = 0.5
"""Seconds kept for the end's sample, plot and report (the final validation and checkpoint are
reserved apart, from the run's own timings)."""


class TokenData:
    """Pretraining's data: batches from the token shards of ``gasungbi prepare``, validation on
    their held-out split (loss and bits per byte)."""

    def __init__(self, tc: TrainConfig, rank: int, world: int):
        self.tc, self.rank, self.world = tc, rank, world
        self.vocab_size = load_manifest(tc.data).vocab_size
        self.tokenizer_dir = tc.data
        self.train = TokenLoader(tc.data, "train", tc.batch_size // world, tc.seq_len, seed=tc.seed,
                                 rank=rank, world_size=world)

    def evaluate(self, objective, amp, alone: bool = False) -> dict:
        """Validation on every rank's share, or (``alone``) all of it by this process."""
        rank, world, reduce = (0, 1, None) if alone else (self.rank, self.world, dist.all_reduce_sum)
        return evaluate(objective, self.tc.data, "val", batch_size=max(1, self.tc.batch_size // self.world),
                        seq_len=self.tc.seq_len, max_batches=self.tc.eval_batches, rank=rank,
                        world_size=world, amp=amp, all_reduce_sum=reduce)


MakeData = Callable[[TrainConfig, int, int], Any]
"""``(config, rank, world) ->`` a data object: ``vocab_size``, ``tokenizer_dir``, ``train`` (a loader
with ``next_batch``, ``state_dict``, ``load_state_dict``) and ``evaluate(objective, amp, alone)``."""


def train(tc: TrainConfig, started: float | None = None, data: MakeData = TokenData) -> dict[str, Any]:
    """Run (or resume) a training run on ``data`` (default: pretraining on token shards); returns
    the final report (also written to out_dir/report.json). ``started``: the
    ``time.perf_counter()`` a time budget counts from (the command's start; default this call)."""
    tc.validate()
    info = dist.setup(tc.device)
    try:
        return Trainer(tc, info, started if started is not None else time.perf_counter(), data).fit()
    finally:
        dist.teardown()


class Trainer:
    """One training run: the model, its objective and optimizers on a :class:`Run`, and the loop."""

    def __init__(self, tc: TrainConfig, info: dist.DistInfo, started: float, make_data: MakeData):
        if tc.batch_size % info.world_size:
            raise ValueError(f"batch_size={tc.batch_size} must be divisible by the {info.world_size} processes")
        self.info, self.started = info, started
        self.cuda = info.device.type == "cuda"
        self.bf16 = tc.precision == "bf16" or (tc.precision in ("auto", "fp8") and self.cuda)
        self.amp = torch.autocast(info.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)
        self.data = make_data(tc, info.rank, info.world_size)  # bad data fails before the directory is claimed
        context = (read_config(tc.init_from) if tc.init_from else
                   tc.model_config(self.data.vocab_size)).max_position_embeddings
        if tc.seq_len > context:  # before the directory is claimed, too
            raise ValueError(f"seq_len={tc.seq_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
        self.run = Run(tc.out_dir, info, resume=tc.resume, overwrite=tc.overwrite, tokenizer=self.data.tokenizer_dir,
                       keep=tc.keep_checkpoints, progress=tc.progress, tensorboard=tc.tensorboard,
                       init_from=tc.init_from)
        self.lora = lora.spec_of(tc)
        if self.lora is not None:
            self.model = self.run.model(lambda: lora.adapted_model(self.lora, info.device, tc.seed), adapters=True)
        else:
            self.model = self.run.model(lambda: self._build(tc))
        self.cfg: ModelConfig = self.model.config
        if tc.precision == "fp8":
            from gasungbi.train.fp8 import apply_fp8
            apply_fp8(self.model)
        self.model.train()
        self.objective = Objective(self.model, tc.mtp_weight, tc.balance_alpha)
        wrapped = self.run.layout(self.objective, tc.expert_parallel, tc.parallel)
        self.wrapped = torch.compile(wrapped) if tc.compile else wrapped
        self.optimizers = build_optimizers(self.model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2),
                                           tc.muon_lr, moments=tc.adam_moments)
        self.run.restore(self.optimizers)
        if self.run.state is not None:
            self.data.train.load_state_dict(self.run.state["loader"])
        self.tc = tc
        self.budget = self._budget(started)
        self.tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
        peak_dtype = torch.float8_e4m3fn if tc.precision == "fp8" and self.cuda else (
            torch.bfloat16 if self.bf16 else torch.float32)
        flops = training_flops_per_token(self.cfg, tc.seq_len)
        if self.lora is not None:  # no weight gradients for the frozen base: forward + input gradients, 4N of 6N
            flops *= 4 / 6
        self.meter = self.run.start_meter(flops, peak_dtype, tc.price_per_hour)
        self.load_stats: dict = {}
        self.last_val: dict = next((h for h in reversed(self.run.history) if "val_loss" in h), {})
        self._announce(tc.init_from or tc.model)

    def _budget(self, started: float) -> Budget:
        """The run's :class:`Budget` (a resumed run continues its clock and schedule), with its tail
        estimated until measured: the final validation, the checkpoint, the sample and report."""
        tc, info, state = self.tc, self.info, self.run.state
        reduce = None
        if info.enabled:
            def reduce(values: list[float]) -> list[float]:
                return dist.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=info.device)).tolist()
        saved = (state or {}).get("budget") or {}
        budget = Budget(tc.time_budget * 60 if tc.time_budget is not None else None, tc.step_limit, started,
                        tc.warmup_steps, before=saved.get("clock", 0.0), reduce=reduce, world=info.world_size)
        budget.load_state_dict(saved)
        weights = sum(p.numel() * p.element_size() for p in lora.trained_parameters(self.model))
        budget.estimate("checkpoint", save_seconds_estimate(3 * weights))  # weights and AdamW's two moments
        budget.estimate("sample and report", FINISH_S)
        if tc.time_budget is not None and info.is_main:  # the plot's import is paid now, not after the last step
            from gasungbi.eval.plots import preload
            preload()
        return budget

    def _build(self, tc: TrainConfig) -> Transformer:
        if tc.init_from:
            from gasungbi.interop.hf import load_model
            return load_model(tc.init_from, device=self.info.device, dtype=torch.float32)
        return build_model(tc.model_config(self.data.vocab_size), device=self.info.device, seed=tc.seed)

    def _announce(self, name: str) -> None:
        """The run's config.json, and one line about the model and the device."""
        if not self.info.is_main:
            return
        tc, pc = self.tc, count_params(self.cfg)
        self.run.write_text("config.json", json.dumps({"train": dataclasses.asdict(tc), "model": dataclasses.asdict(self.cfg),
                                                       "params_total": pc.total_with_mtp,
                                                       "params_activated": pc.activated}, indent=2))
        resuming = f", resuming from {self.run.resume_from}" if self.run.resume_from else ""
        if self.lora is not None:
            print(lora.describe(self.model))
        print(f"model {name}: {pc.total_with_mtp / 1e6:.2f}M parameters ({pc.activated / 1e6:.2f}M activated), "
              f"{self.tokens_per_step:,} tokens/step, device {self.run.device_name} x{self.info.world_size}, "
              f"peak {self.meter.peak_flops / 1e9:.1f} GFLOP/s{resuming}")

    # --- the loop --------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train until the budget (steps, the clock, or both) or ``stop_after`` or a signal ends the
        run; the report."""
        tc, run, budget = self.tc, self.run, self.budget
        stop = StopFlag()
        bar = run.progress(tc.step_limit)
        step, figures = run.start_step, None
        with stop.installed():
            while stop.signal is None and not (tc.stop_after and step >= tc.stop_after):
                if budget.out_of_time(step, self._due_after(step + 1)):
                    break
                started = budget.step_started()
                figures = self.step(step)
                budget.step_done(started)
                # a validation batch is a forward without the backward: about a third of a step's work
                budget.estimate("validation", tc.eval_batches * budget.step_s / (2 * tc.grad_accum))
                step += 1
                self.meter.update(self.tokens_per_step)
                self.after_step(step, figures)
                bar.update(1)
                left = f" | {max(0.0, budget.seconds - budget.now()):.0f} s left" if budget.seconds else ""
                bar.set_postfix_str(f"loss {figures['lm_loss']:.3f} | {self.meter.tokens_per_s:,.0f} tok/s | "
                                    f"MFU {self.meter.mfu:.1%} | ${self.meter.dollars:.4f}" +
                                    _val_text(self.last_val) + left)
        bar.close()
        if figures is not None and step % tc.log_interval:  # the last step's row
            self._log_step(step, figures)
        return self.finish(step, stop.signal)

    def _due_after(self, step: int) -> float:
        """Seconds of the intervals' work due after step ``step`` (validation, checkpoint)."""
        tc, tail = self.tc, self.budget.tail
        due = tail.get("validation", 0.0) if tc.eval_interval and step % tc.eval_interval == 0 else 0.0
        return due + (tail.get("checkpoint", 0.0) if tc.ckpt_interval and step % tc.ckpt_interval == 0 else 0.0)

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (``grad_accum`` micro-batches) at the scheduled learning rate, then the
        expert-bias update; the step's mean losses and gradient norm (one host sync per step)."""
        tc = self.tc
        progress, warmup = self.budget.schedule(step)
        mult = lr_multiplier(progress, warmup, tc.schedule, tc.min_lr_ratio, tc.decay_frac)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
        sums: dict[str, torch.Tensor] = {}
        expert_counts = None  # (n_moe_layers, E) tokens per expert over the step's micro-batches
        for micro in range(tc.grad_accum):
            x, y = self.data.train.next_batch()
            x, y = x.to(self.info.device, non_blocking=True), y.to(self.info.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if micro < tc.grad_accum - 1 and hasattr(self.wrapped, "no_sync"):
                sync = self.wrapped.no_sync()
            with sync, self.amp:
                losses = self.wrapped(x, y)
                (losses["loss"] / tc.grad_accum).backward()
            counts = losses.pop("expert_counts", None)
            if counts is not None:
                expert_counts = counts if expert_counts is None else expert_counts + counts
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / tc.grad_accum
        grad_norm = self.run.clip(tc.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if expert_counts is not None:
            gamma = 0.0 if self.lora is not None else tc.bias_update_speed  # LoRA: the routing bias is frozen
            self.load_stats = update_expert_bias(self.model, expert_counts, gamma,
                                                 dist.all_reduce_sum if self.info.enabled else None)
        if self.info.enabled:  # the global mean loss
            both = dist.all_reduce_sum(torch.stack([sums["loss"], sums["lm_loss"]])) / self.info.world_size
            sums["loss"], sums["lm_loss"] = both[0], both[1]
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        names = list(sums)
        values = torch.stack([sums[k] for k in names] + [grad_norm.detach().float().to(self.info.device)]).tolist()
        return {**dict(zip(names, values[:-1])), "grad_norm": values[-1]}

    def after_step(self, step: int, figures: dict[str, float]) -> None:
        """The intervals: a metrics row, a validation, a sample, a checkpoint (each one timed for the
        budget's tail)."""
        tc, budget = self.tc, self.budget
        if step % tc.log_interval == 0:
            self._log_step(step, figures)
        last = step == tc.step_limit  # the final validation and checkpoint come with the report
        if tc.eval_interval and step % tc.eval_interval == 0 and not last:
            t = time.perf_counter()
            self.last_val = self.validate(step)
            budget.measure("validation", time.perf_counter() - t)
        if tc.sample_interval and step % tc.sample_interval == 0:
            sampler = self.run.whole_model()
            if self.info.is_main:
                self._write_sample(step, _sample(sampler, tc, self.data.tokenizer_dir))
        if tc.ckpt_interval and step % tc.ckpt_interval == 0 and not last:
            t = time.perf_counter()
            self.save(step)
            budget.measure("checkpoint", time.perf_counter() - t)

    def _log_step(self, step: int, figures: dict[str, float]) -> None:
        meter = self.meter
        self.run.log({"step": step, "lr": self.optimizers[0].param_groups[0]["lr"], **figures,
                      "tokens": meter.tokens, "tokens_per_s": round(meter.tokens_per_s, 1),
                      "mfu": round(meter.mfu, 5), "dollars": round(meter.dollars, 6),
                      "elapsed_s": round(meter.elapsed, 2),
                      **{k: v for k, v in self.load_stats.items() if k != "load"}})

    def validate(self, step: int) -> dict:
        """Validation loss (and bits per byte), logged; under expert parallelism rank 0 evaluates
        all of it on the gathered model (ranks may hold unequal shares of the validation set)."""
        if self.run.mesh is None:
            res = self.data.evaluate(self.wrapped, self.amp)
        else:
            whole = self.run.whole_model()
            res = [self.data.evaluate(Objective(whole.to(self.info.device)), self.amp, alone=True)
                   if self.info.is_main else None]
            torch.distributed.broadcast_object_list(res, src=0)
            res = res[0]
        row = {"step": step, "tokens": self.meter.tokens, "val_loss": res["loss"], "val_bpb": res.get("bpb")}
        self.run.log(row)
        return row

    def save(self, step: int, whole: Transformer | None = None):
        state = {"loader": self.data.train.state_dict(),
                 "budget": self.budget.state_dict(),
                 "train_config": json.dumps(dataclasses.asdict(self.tc))}
        return self.run.save(step, state, whole)

    def _write_sample(self, step: int, text: str) -> None:
        with open(self.run.out / "samples.txt", "a") as f:
            f.write(f"--- step {step} ---\n{text}\n")

    def finish(self, step: int, signum: int | None) -> dict[str, Any]:
        """The last validation, the final checkpoint (Hugging Face layout), the sample, the report."""
        tc, run, info = self.tc, self.run, self.info
        if not self.cuda and tc.time_budget is None:  # a CPU peak measured while something else ran is too low
            self.meter.peak_flops = max(self.meter.peak_flops, device_peak(info.device, torch.float32)[0])
        if signum is None and step != tc.stop_after and not any(h["step"] == step and "val_loss" in h
                                                               for h in run.history):
            self.last_val = self.validate(step)  # (a rerun of a finished run has it already)
        whole = run.whole_model()
        path = self.save(step, whole)
        report = {"step": step, "max_steps": tc.step_limit, "interrupted": signum is not None,
                  "checkpoint": str(path), "preset": tc.model, "model": to_hf_config(self.cfg),
                  "device": run.device_name, "device_count": info.world_size, **self.meter.summary(),
                  "final_train_loss": next((h["lm_loss"] for h in reversed(run.history) if "lm_loss" in h), None),
                  "val_loss": self.last_val.get("val_loss"), "val_bpb": self.last_val.get("val_bpb"),
                  "expert_load": self.load_stats.get("load", []), "max_violation": self.load_stats.get("max_violation")}
        if tc.time_budget is not None:
            report["time_budget"] = {"minutes": tc.time_budget, **self.budget.record()}
        if info.is_main:
            report["sample"] = _sample(whole, tc, self.data.tokenizer_dir)
            self._write_sample(step, report["sample"])
            from gasungbi.eval.plots import loss_curve
            loss_curve(run.history, run.out / "loss.png")
            if signum is not None:
                print(f"\ninterrupted by signal {signum} at step {step}; checkpoint saved to {path}. "
                      f"Resume with the same command plus --resume.")
        return run.finish(report)


def _val_text(row: dict) -> str:
    if row.get("val_bpb") is not None:
        return f" | val bpb {row['val_bpb']:.3f}"
    return f" | val loss {row['val_loss']:.3f}" if row else ""


def _sample(model, tc: TrainConfig, tokenizer_dir: str) -> str:
    """Greedy continuation of ``tc.sample_prompt`` with the run's tokenizer (a quick look), on the
    decode engine."""
    from gasungbi.data.tokenizer import load_tokenizer
    from gasungbi.infer.generate import generate

    tok = load_tokenizer(tokenizer_dir)
    prompt = tok.encode(tc.sample_prompt).ids
    ids = ([model.config.bos_token_id] if model.config.bos_token_id is not None else []) + prompt
    room = model.config.max_position_embeddings - len(ids)
    was_training = model.training
    model.eval()
    try:
        [out] = generate(model, [ids], max_new_tokens=max(1, min(tc.sample_tokens, room)), add_bos=False)
    finally:
        model.train(was_training)
    return tok.decode(prompt + out.tokens)  # the prompt and its continuation

"""Pretraining loop: one function, :func:`train`, read top to bottom.

Per optimizer step: ``grad_accum`` micro-batches of next-token + MTP (+ optional balance) loss,
gradient clipping, the optimizer step(s) at the scheduled learning rate, then the
auxiliary-loss-free expert-bias update. At intervals: validation loss and bits per byte, sample
text, checkpoints. SIGINT/SIGTERM finish the current step, save a checkpoint and return cleanly;
``resume=True`` continues from the newest checkpoint and reproduces the uninterrupted run exactly
on CPU (same weights, bit for bit).

Precision (``precision``): ``auto`` is fp32 on CPU (bf16 autocast is ~14x slower without
AVX512-BF16) and bf16 autocast with fp32 master weights on CUDA; ``fp32`` and ``bf16`` force one;
``fp8`` swaps in DeepSeek-V3's block-scaled FP8 GEMMs (:mod:`gasungbi.train.fp8`) after the model is
built and before the optimizer, with the rest as ``auto``. ``adam_moments=bf16`` keeps AdamW's
moments in BF16 (V3 Sec. 3.3.3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from gasungbi.config import ModelConfig, get_preset, read_config, to_hf_config
from gasungbi.data.shards import TokenLoader, load_manifest
from gasungbi.eval.perplexity import evaluate, evaluate_batches
from gasungbi.model.accounting import count_params, training_flops_per_token
from gasungbi.model.transformer import Transformer, build_model
from gasungbi.train import checkpoint as ckpt
from gasungbi.train import distributed as dist
from gasungbi.train import sharded
from gasungbi.train.expert_parallel import gathered_model
from gasungbi.train.meter import CostMeter, device_peak
from gasungbi.train.objective import Objective, update_expert_bias
from gasungbi.train.optim import build_optimizers, lr_multiplier


@dataclass
class TrainConfig:
    """Everything a pretraining run needs. CLI flags and ``--config FILE`` map onto these fields."""

    data: str = ""  # pretrain: shard directory made by `gasungbi prepare`; sft: a JSONL of conversations
    out_dir: str = "runs/train"  # run directory: checkpoints, metrics.jsonl, loss.png, report.json
    task: Literal["pretrain", "sft"] = "pretrain"  # sft: loss on the assistant tokens of chat conversations
    init_from: str | None = None  # a Hugging Face checkpoint to start from (with its tokenizer)
    model: str = "cpu-tiny"  # model preset (see `gasungbi params`), when not init_from; vocab_size follows the tokenizer
    model_overrides: dict[str, Any] = field(default_factory=dict)  # model config fields to change (CLI: --set)
    # batch: tokens per optimizer step = batch_size x seq_len x grad_accum (global, all ranks)
    batch_size: int = 16  # sequences per micro-batch, all processes together
    seq_len: int = 256  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps of the whole run (the schedule's horizon)
    time_budget: float | None = None  # minutes: set max_steps from a measured step time so training and its validations fit (train/budget.py)
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

    def model_config(self, vocab_size: int) -> ModelConfig:
        cfg = get_preset(self.model).replace(**self.model_overrides)
        if cfg.vocab_size != vocab_size:
            cfg = cfg.replace(vocab_size=vocab_size)
        return cfg

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"invalid training config: {msg}")
        for name in ("batch_size", "seq_len", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
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
        if self.task not in ("pretrain", "sft"):
            bad(f"task={self.task!r}; choose pretrain or sft")
        if not self.data:
            bad("data (a shard directory made by `gasungbi prepare`, or a JSONL for sft) is required")
        if self.resume and self.overwrite:
            bad("resume continues the run in out_dir and overwrite replaces it: choose one")
        if self.task == "sft" and not self.init_from:
            bad("sft needs init_from, the checkpoint to fine-tune (it also provides the tokenizer)")

    @property
    def tokenizer_dir(self) -> str:
        return self.init_from if self.task == "sft" else self.data


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.signal: int | None = None

    @contextlib.contextmanager
    def installed(self):
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.signal is not None:  # a second Ctrl-C: give up immediately
                signal.signal(signum, old[signum])
                raise KeyboardInterrupt
            self.signal = signum

        try:
            for s in old:
                signal.signal(s, handler)
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def train(tc: TrainConfig, started: float | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; returns the final report (also written to out_dir/report.json).
    ``started``: the ``time.perf_counter()`` a time budget counts from (the command's start; default
    this call)."""
    tc.validate()
    info = dist.setup(tc.device)
    try:
        return _train(tc, info, started if started is not None else time.perf_counter())
    finally:
        dist.teardown()


class _Data:
    """The training batches and validation of a task: token shards (pretrain) or chats (sft)."""

    def __init__(self, tc: TrainConfig, rank: int, world: int):
        self.tc, self.rank, self.world = tc, rank, world
        if tc.task == "sft":
            from gasungbi.data.conventions import Conventions
            from gasungbi.data.sft import SFTLoader, read_conversations
            tok = Conventions.load(tc.init_from)  # the checkpoint's own chat template
            convs = read_conversations(tc.data)
            self.vocab_size = tok.tokenizer.get_vocab_size()
            self.train = SFTLoader(tc.data, tok, "train", tc.batch_size // world, tc.seq_len, seed=tc.seed,
                                   rank=rank, world_size=world, conversations=convs)
            self.val = SFTLoader(tc.data, tok, "val", max(1, tc.batch_size // world), tc.seq_len, seed=tc.seed,
                                 rank=rank, world_size=world, conversations=convs)
        else:
            self.vocab_size = load_manifest(tc.data).vocab_size
            self.train = TokenLoader(tc.data, "train", tc.batch_size // world, tc.seq_len, seed=tc.seed,
                                     rank=rank, world_size=world)

    def evaluate(self, objective, amp, alone: bool = False) -> dict:
        """Validation on every rank's share, or (``alone``) all of it by this process."""
        rank, world, reduce = (0, 1, None) if alone else (self.rank, self.world, dist.all_reduce_sum)
        if self.tc.task == "sft":
            saved = self.val.rank, self.val.world_size
            self.val.rank, self.val.world_size = rank, world
            batches = list(self.val.eval_batches(self.tc.eval_batches))
            self.val.rank, self.val.world_size = saved
            return evaluate_batches(objective, batches, amp, all_reduce_sum=reduce)
        return evaluate(objective, self.tc.data, "val", batch_size=max(1, self.tc.batch_size // self.world),
                        seq_len=self.tc.seq_len, max_batches=self.tc.eval_batches, rank=rank,
                        world_size=world, amp=amp, all_reduce_sum=reduce)


def _train(tc: TrainConfig, info: dist.DistInfo, started: float) -> dict[str, Any]:
    out = Path(tc.out_dir)
    ckpt.claim_run_dir(out, tc.resume, tc.overwrite, remove=info.is_main)
    world = info.world_size
    if tc.batch_size % world:
        raise ValueError(f"batch_size={tc.batch_size} must be divisible by the {world} processes")
    cuda = info.device.type == "cuda"
    bf16 = tc.precision == "bf16" or (tc.precision in ("auto", "fp8") and cuda)
    amp = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    # --- model, optimizer, data, possibly resumed ----------------------------------------------
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    start_step, state = 0, None
    data = _Data(tc, info.rank, world)
    resume_from = ckpt.latest_checkpoint(out) if tc.resume else None
    sharded_from = resume_from is not None and sharded.is_sharded(resume_from)
    if sharded_from:  # the weights are read into the model once it is laid out (below)
        state = ckpt.load_training_state(resume_from)
        cfg = read_config(resume_from)
        model = build_model(cfg, device=info.device, seed=tc.seed)
        start_step = state["step"]
    elif resume_from is not None:
        model, state = ckpt.load_checkpoint(resume_from, device=info.device)
        cfg = model.config
        start_step = state["step"]
    elif tc.init_from:
        from gasungbi.interop.hf import load_model
        model = load_model(tc.init_from, device=info.device, dtype=torch.float32)
        cfg = model.config
    else:
        cfg = tc.model_config(data.vocab_size)
        model = build_model(cfg, device=info.device, seed=tc.seed)
    if tc.precision == "fp8":
        from gasungbi.train.fp8 import apply_fp8
        apply_fp8(model)
    model.train()
    objective = Objective(model, tc.mtp_weight, tc.balance_alpha)
    mesh = None  # the (dp, ep) mesh of expert parallelism
    if tc.expert_parallel > 1:
        from gasungbi.train import expert_parallel as ep
        mesh = ep.ep_mesh(world, tc.expert_parallel, info.device.type)
        ep.apply_expert_parallel(model, mesh)
    wrapped = dist.wrap(objective, info, tc.parallel, ignore=ep.expert_param_names(objective) if mesh is not None else ())
    if tc.compile:
        wrapped = torch.compile(wrapped)
    optimizers = build_optimizers(model, tc.optimizer, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.muon_lr,
                                  moments=tc.adam_moments)
    loader = data.train
    if state is not None:
        sharded.load_run_checkpoint(resume_from, objective, optimizers, mesh, state)
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    budget: dict | None = None
    if tc.time_budget is not None:
        tc, budget = _size_to_budget(tc, cfg, info, amp, state, time.perf_counter() - started)

    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    peak_dtype = torch.float8_e4m3fn if tc.precision == "fp8" and cuda else torch.bfloat16 if bf16 else torch.float32
    peak, catalog_price, device_name = device_peak(info.device, peak_dtype)
    meter = CostMeter(training_flops_per_token(cfg, tc.seq_len), peak,
                      tc.price_per_hour if tc.price_per_hour is not None else (catalog_price or 0.0), world,
                      elapsed_before=state["meter"]["elapsed"] if state else 0.0,
                      tokens_before=state["meter"]["tokens"] if state else 0)
    history: list[dict] = state["history"] if state else []
    if tc.resume and info.is_main:  # rows logged after the checkpoint (before a kill) are logged again
        ckpt.truncate_metrics(out / "metrics.jsonl", start_step)
    log = _Logger(out, tc, info.is_main)
    if info.is_main:
        pc = count_params(cfg)
        log.write_text("config.json", json.dumps({"train": dataclasses.asdict(tc), "model": dataclasses.asdict(cfg),
                                                  "params_total": pc.total_with_mtp,
                                                  "params_activated": pc.activated}, indent=2))
        print(f"model {tc.init_from or tc.model}: {pc.total_with_mtp / 1e6:.2f}M parameters ({pc.activated / 1e6:.2f}M activated), "
              f"{tokens_per_step:,} tokens/step, device {device_name} x{world}, "
              f"peak {peak / 1e9:.1f} GFLOP/s" + (f", resuming from {resume_from}" if resume_from else ""))

    def gather():
        """A plain CPU copy of the model on rank 0 (collective: every rank must call it)."""
        return gathered_model(objective, cfg, mesh, info.is_main)

    def save(step: int, hf_model: Transformer | None = None) -> Path | None:
        """One process: the Hugging Face layout plus the full training state. Under torchrun: sharded
        (every rank writes its part), plus the Hugging Face layout of ``hf_model`` (the final one)."""
        training_state = {"step": step, "loader": loader.state_dict(),
                          "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                          "meter": {"elapsed": meter.elapsed, "tokens": meter.tokens}, "time_budget": budget,
                          "history": history, "train_config": json.dumps(dataclasses.asdict(tc))}
        return sharded.save_run_checkpoint(out, step, objective, optimizers, mesh, training_state, info,
                                           tc.tokenizer_dir, tc.keep_checkpoints, hf_model)

    def validate(step: int) -> dict:
        if mesh is None:
            res = data.evaluate(wrapped, amp)
        else:  # ranks may hold unequal shares of the validation set: rank 0 evaluates all of it
            cpu_model = gather()
            res = [data.evaluate(Objective(cpu_model.to(info.device)), amp, alone=True) if info.is_main else None]
            torch.distributed.broadcast_object_list(res, src=0)
            res = res[0]
        row = {"step": step, "tokens": meter.tokens, "val_loss": res["loss"], "val_bpb": res.get("bpb")}
        history.append(row)
        log.metrics(row)
        return row

    # --- the loop -----------------------------------------------------------------------------
    end_step = min(tc.max_steps, tc.stop_after or tc.max_steps)
    stop = _StopFlag()
    bar = log.progress(start_step, end_step)
    last_val: dict = next((h for h in reversed(history) if "val_loss" in h), {})
    load_stats: dict = {}
    step, first_step_done = start_step, 0.0
    with stop.installed():
        while step < end_step and stop.signal is None:
            mult = lr_multiplier(step, tc.max_steps, tc.warmup_steps, tc.schedule, tc.min_lr_ratio, tc.decay_frac)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["initial_lr"] * mult
            sums: dict[str, float] = {}
            expert_counts = None  # (n_moe_layers, E) tokens per expert over the step's micro-batches
            for micro in range(tc.grad_accum):
                x, y = loader.next_batch()
                x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                sync = contextlib.nullcontext()
                if micro < tc.grad_accum - 1 and hasattr(wrapped, "no_sync"):
                    sync = wrapped.no_sync()
                with sync, amp:
                    losses = wrapped(x, y)
                    (losses["loss"] / tc.grad_accum).backward()
                counts = losses.pop("expert_counts", None)
                if counts is not None:
                    expert_counts = counts if expert_counts is None else expert_counts + counts
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / tc.grad_accum
            if mesh is None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            else:
                ep.reduce_expert_grads(model, mesh)
                grad_norm = ep.clip_grad_norm(model, tc.grad_clip, mesh)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if expert_counts is not None:
                load_stats = update_expert_bias(model, expert_counts, tc.bias_update_speed,
                                                dist.all_reduce_sum if info.enabled else None)
            step += 1
            if info.enabled:  # report the global mean loss
                t = torch.tensor([sums["loss"], sums["lm_loss"]], device=info.device)
                dist.all_reduce_sum(t)
                sums["loss"], sums["lm_loss"] = (t / world).tolist()
            meter.update(tokens_per_step)
            if step == start_step + 1:
                first_step_done = meter.elapsed
            if budget is not None and step == max(tc.warmup_steps, start_step + 3) and "resized" not in budget \
                    and not budget.get("resumed"):
                tc, end_step = _resize_to_budget(tc, budget, (meter.elapsed - first_step_done) / (step - start_step - 1),
                                                 step, time.perf_counter() - started, info)
                bar.total = end_step
            if step % tc.log_interval == 0 or step == end_step:
                row = {"step": step, "lr": optimizers[0].param_groups[0]["lr"], **sums,
                       "grad_norm": float(grad_norm), "tokens": meter.tokens,
                       "tokens_per_s": round(meter.tokens_per_s, 1), "mfu": round(meter.mfu, 5),
                       "dollars": round(meter.dollars, 6), "elapsed_s": round(meter.elapsed, 2),
                       **{k: v for k, v in load_stats.items() if k != "load"}}
                history.append(row)
                log.metrics(row)
            if tc.eval_interval and step % tc.eval_interval == 0 and step < end_step:
                last_val = validate(step)
            if tc.sample_interval and step % tc.sample_interval == 0:
                sampler = gather() if (tc.parallel == "fsdp" or mesh is not None) and info.enabled else model
                if info.is_main:
                    log.sample(step, _sample(sampler, tc))
            if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < end_step:
                save(step)
            bar.update(1)
            bar.set_postfix_str(f"loss {sums['lm_loss']:.3f} | {meter.tokens_per_s:,.0f} tok/s | "
                                f"MFU {meter.mfu:.1%} | ${meter.dollars:.4f}" +
                                _val_text(last_val))
    bar.close()
    interrupted = stop.signal is not None
    if not cuda and budget is None:  # a CPU peak measured while something else ran is too low: keep the better of two
        meter.peak_flops = max(meter.peak_flops, device_peak(info.device, torch.float32)[0])
    if not interrupted and step == tc.max_steps and not any(h["step"] == step and "val_loss" in h for h in history):
        last_val = validate(step)  # (a rerun of a finished run has it already)
    final_model = gather() if info.enabled else None  # the final checkpoint has the HF layout
    path = save(step, final_model)
    report = {"step": step, "max_steps": tc.max_steps, "interrupted": interrupted, "checkpoint": str(path),
              "preset": tc.model, "model": to_hf_config(cfg),
              "device": device_name, "device_count": world, **meter.summary(),
              "final_train_loss": next((h["lm_loss"] for h in reversed(history) if "lm_loss" in h), None),
              "val_loss": last_val.get("val_loss"), "val_bpb": last_val.get("val_bpb"),
              "expert_load": load_stats.get("load", []), "max_violation": load_stats.get("max_violation")}
    if budget is not None:
        report["time_budget"] = budget
    sampler = final_model if (tc.parallel == "fsdp" or mesh is not None) and info.enabled else model
    if info.is_main:
        report["sample"] = _sample(sampler, tc)
        log.sample(step, report["sample"])
        log.write_text("report.json", json.dumps(report, indent=2))
        log.plot(history)
        if interrupted:
            print(f"\ninterrupted by signal {stop.signal} at step {step}; checkpoint saved to {path}. "
                  f"Resume with the same command plus --resume.")
    log.close()
    dist.barrier()  # every rank leaves together: a rank tearing down early aborts the others
    return report


def _size_to_budget(tc: TrainConfig, cfg: ModelConfig, info: dist.DistInfo, amp, state: dict | None,
                    spent: float = 0.0):
    """``tc`` with max_steps sized to ``tc.time_budget`` minutes less the ``spent`` seconds of setup
    and the sizing's own timings (the warmup capped at a fifth of the steps), and the sizing's
    record; a resumed run keeps the steps it was sized to."""
    from gasungbi.train.budget import TAIL_S, measure_seconds, steps_for_budget

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


def _resize_to_budget(tc: TrainConfig, budget: dict, step_s: float, step: int, spent: float,
                      info: dist.DistInfo) -> tuple[TrainConfig, int]:
    """Once, at the end of warmup: the horizon re-sized from the real steps' time (``step_s``, the
    mean after the first step; the ranks' mean under torchrun), since a step timed on random tokens
    before training can be off by 20-40% on a shared CPU (the data, logging, balancing updates, and a
    machine that slows under load). At the end of warmup the learning rate is the peak for any
    horizon, so the schedule stays continuous. Recorded in ``budget["resized"]``; a resumed run keeps
    its sizing."""
    from gasungbi.train.budget import TAIL_S, steps_for_budget

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


def _val_text(row: dict) -> str:
    if row.get("val_bpb") is not None:
        return f" | val bpb {row['val_bpb']:.3f}"
    return f" | val loss {row['val_loss']:.3f}" if row else ""


def _sample(model, tc: TrainConfig) -> str:
    """Greedy continuation of ``tc.sample_prompt`` with the run's tokenizer (a quick look), on the
    decode engine."""
    from gasungbi.data.tokenizer import load_tokenizer
    from gasungbi.infer.generate import generate

    tok = load_tokenizer(tc.tokenizer_dir)
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


class _Logger:
    """metrics.jsonl, a progress bar, samples, TensorBoard (optional) and the loss PNG (rank 0)."""

    def __init__(self, out: Path, tc: TrainConfig, main: bool):
        self.out, self.main, self.tc = out, main, tc
        self.tb = None
        if main:
            out.mkdir(parents=True, exist_ok=True)
            if tc.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
                self.tb = SummaryWriter(str(out / "tb"))

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            (self.out / name).write_text(text + "\n")

    def metrics(self, row: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def sample(self, step: int, text: str) -> None:
        if self.main:
            with open(self.out / "samples.txt", "a") as f:
                f.write(f"--- step {step} ---\n{text}\n")

    def progress(self, start: int, end: int):
        from tqdm import tqdm
        return tqdm(total=end, initial=start, desc="train", unit="step", disable=not (self.main and self.tc.progress),
                    dynamic_ncols=True)

    def plot(self, history: list[dict]) -> None:
        from gasungbi.eval.plots import loss_curve
        loss_curve(history, self.out / "loss.png")

    def close(self) -> None:
        if self.tb:
            self.tb.close()

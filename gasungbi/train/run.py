"""What every training loop does around its steps (pretraining, SFT, GRPO): one :class:`Run`.

A loop makes a :class:`Run` (which claims the run directory and reads the checkpoint it resumes),
takes the model from it (:meth:`Run.model`), lays its trained module out for the processes
(:meth:`Run.layout`: expert parallelism, then DDP or FSDP2), builds its optimizers and
:meth:`Run.restore`\\ s them, starts the cost meter (:meth:`Run.start_meter`), and then steps:
:meth:`Run.clip` clips the gradients in either layout, :meth:`Run.log` writes metrics.jsonl (and
TensorBoard), :meth:`Run.save` writes a checkpoint (the Hugging Face layout in one process, sharded
under torchrun) and :meth:`Run.finish` the report. The loop keeps only what is its own: its data,
its loss and its schedule.

The trained module is the one DDP wraps: the pretraining ``Objective`` or GRPO's ``Policy``; its
``model`` attribute is the Transformer, so checkpoints of every loop share one key layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from gasungbi.config import read_config
from gasungbi.interop.hf import load_model
from gasungbi.model.transformer import Transformer, build_model
from gasungbi.train import checkpoint as ckpt
from gasungbi.train import distributed as dist
from gasungbi.train import lora, sharded
from gasungbi.train.expert_parallel import gathered_model
from gasungbi.train.meter import CostMeter, device_peak


class Run:
    """One run directory and the state a loop resumes from, the module's layout over the processes,
    its optimizers, its cost meter and its logs."""

    def __init__(self, out_dir: str | Path, info: dist.DistInfo, *, resume: bool, overwrite: bool,
                 tokenizer: str | Path, keep: int, name: str = "train", progress: bool = True,
                 tensorboard: bool = False, init_from: str | Path | None = None):
        """Claim ``out_dir`` (an earlier run there is refused unless ``resume`` or ``overwrite``; so
        are a model checkpoint without ``overwrite`` and, always, ``init_from``, the checkpoint the run
        starts from) and read the newest checkpoint's training state when resuming. ``tokenizer``:
        the directory whose tokenizer the checkpoints carry; ``keep``: checkpoints kept."""
        self.out, self.info, self.tokenizer, self.keep = Path(out_dir), info, tokenizer, keep
        self.name, self.show_progress = name, progress
        ckpt.claim_run_dir(self.out, resume, overwrite, remove=info.is_main, inputs=(init_from,) if init_from else ())
        dist.barrier()  # no rank looks at the directory after the main one has started writing
        self.resume_from = ckpt.latest_checkpoint(self.out) if resume else None
        self.state: dict | None = ckpt.load_training_state(self.resume_from) if self.resume_from else None
        self.start_step: int = self.state["step"] if self.state else 0
        self.history: list[dict] = self.state["history"] if self.state else []
        self.module: nn.Module | None = None
        self.mesh = None  # the (dp, ep) device mesh of expert parallelism
        self.parallel = "ddp"
        self.optimizers: list = []
        self.meter: CostMeter | None = None
        self.device_name = ""
        self._tb = None
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume:  # rows logged after the checkpoint (before a kill) are logged again
                ckpt.truncate_metrics(self.out / "metrics.jsonl", self.start_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
                self._tb = SummaryWriter(str(self.out / "tb"))

    # --- the model and its layout ------------------------------------------------------------------

    def model(self, build: Callable[[], Transformer], adapters: bool = False) -> Transformer:
        """The run's model (fp32, on the device): the resumed checkpoint's, else ``build()``. A
        sharded checkpoint's weights are read by :meth:`restore`, once the model is laid out.
        ``adapters``: the run trains LoRA adapters (:mod:`gasungbi.train.lora`) and ``build()`` gives
        its adapted base, also when resuming (:meth:`restore` reads the adapters)."""
        device = self.info.device
        if self.resume_from is not None and lora.is_adapter_dir(self.resume_from) != adapters:
            held = "LoRA adapters" if not adapters else "a whole model, not LoRA adapters"
            raise ValueError(f"{self.resume_from} holds {held}: resume it with the flags it was started with "
                             f"({'with' if not adapters else 'without'} --lora-rank)")
        if self.resume_from is None or adapters:
            return build()
        if sharded.is_sharded(self.resume_from):
            return build_model(read_config(self.resume_from), device=device)
        return load_model(self.resume_from, device=device, dtype=torch.float32)

    def layout(self, module: nn.Module, expert_parallel: int = 1, parallel: str = "ddp") -> nn.Module:
        """Lay ``module`` out for the processes: the routed experts sharded over ``expert_parallel``
        ranks (tokens exchanged all-to-all), then DDP or FSDP2 over all ranks for the rest. Returns
        the module to call (``module`` itself in one process)."""
        self.module, self.parallel = module, parallel
        ignore: list[str] = []
        if expert_parallel > 1:
            from gasungbi.train import expert_parallel as ep

            self.mesh = ep.ep_mesh(self.info.world_size, expert_parallel, self.info.device.type)
            ep.apply_expert_parallel(module.model, self.mesh)
            ignore = ep.expert_param_names(module)
        return dist.wrap(module, self.info, parallel, ignore=ignore)

    @property
    def ep_group(self):
        """The process group a rollout's expert-parallel ranks exchange tokens in (None without EP)."""
        return self.mesh["ep"].get_group() if self.mesh is not None else None

    def restore(self, optimizers: list) -> None:
        """Keep ``optimizers`` for :meth:`save`; when resuming, fill them (and, from a sharded
        checkpoint, the weights; from a LoRA run's, the adapters) and the random generators from the
        checkpoint."""
        self.optimizers = optimizers
        if self.state is None:
            return
        if lora.is_adapter_dir(self.resume_from):
            lora.load_adapters(self.module.model, self.resume_from)
        sharded.load_run_checkpoint(self.resume_from, self.module, optimizers, self.mesh, self.state)
        torch.set_rng_state(self.state["rng"]["torch"])
        if "python" in self.state["rng"]:
            random.setstate(self.state["rng"]["python"])

    def start_meter(self, flops_per_token: float, peak_dtype: torch.dtype, price_per_hour: float | None) -> CostMeter:
        """The cost meter (continuing a resumed run's time and tokens) at the device's peak for
        ``peak_dtype``; the price is ``price_per_hour``, else the catalog's (0 when unknown)."""
        peak, catalog_price, self.device_name = device_peak(self.info.device, peak_dtype)
        before = self.state["meter"] if self.state else {"elapsed": 0.0, "tokens": 0}
        self.meter = CostMeter(flops_per_token, peak,
                               price_per_hour if price_per_hour is not None else (catalog_price or 0.0),
                               self.info.world_size, elapsed_before=before["elapsed"], tokens_before=before["tokens"])
        return self.meter

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients' global norm to ``max_norm`` (expert gradients reduced over their
        data-parallel replicas first); returns the norm before clipping."""
        model = self.module.model
        if self.mesh is None:
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        from gasungbi.train import expert_parallel as ep

        ep.reduce_expert_grads(model, self.mesh)
        return ep.clip_grad_norm(model, max_norm, self.mesh)

    def whole_model(self) -> Transformer | None:
        """The whole model on the main process, None elsewhere (collective under torchrun): the
        model itself where every process holds all of it, a gathered CPU copy under FSDP or EP."""
        model = self.module.model
        if not self.info.enabled or (self.mesh is None and self.parallel == "ddp"):
            return model if self.info.is_main else None
        return gathered_model(self.module, model.config, self.mesh, self.info.is_main)

    # --- checkpoints, logs, report -----------------------------------------------------------------

    def save(self, step: int, state: dict, whole: Transformer | None = None) -> Path | None:
        """Checkpoint ``step`` with the loop's own training ``state`` (its data position, config...),
        the run's history, generators and meter. One process: the Hugging Face layout plus the
        training state. Under torchrun every rank writes its shards, and a checkpoint given
        ``whole`` (:meth:`whole_model`, the final one) also has the Hugging Face layout. Collective
        under torchrun; returns the path on the main process."""
        full = {"step": step, "history": self.history,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "meter": {"elapsed": self.meter.elapsed, "tokens": self.meter.tokens}, **state}
        if whole is None and not self.info.enabled:
            whole = self.module.model
        return sharded.save_run_checkpoint(self.out, step, self.module, self.optimizers, self.mesh, full, self.info,
                                           self.tokenizer, self.keep, whole)

    def log(self, row: dict, history: bool = True) -> None:
        """Append ``row`` to metrics.jsonl (and TensorBoard) on the main process; ``history``: also
        to the history the checkpoints carry."""
        if history:
            self.history.append(row)
        if not self.info.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def progress(self, total: int):
        """A progress bar of ``total`` steps from the resumed step (shown on the main process)."""
        from tqdm import tqdm

        return tqdm(total=total, initial=self.start_step, desc=self.name, unit="step", dynamic_ncols=True,
                    disable=not (self.info.is_main and self.show_progress))

    def write_text(self, name: str, text: str) -> None:
        if self.info.is_main:
            (self.out / name).write_text(text + "\n")

    def finish(self, report: dict) -> dict:
        """Write report.json (main process), close the logs, and wait for every rank: a rank tearing
        down early aborts the others."""
        self.write_text("report.json", json.dumps(report, indent=2))
        if self._tb is not None:
            self._tb.close()
        dist.barrier()
        return report


class StopFlag:
    """Set by SIGINT/SIGTERM while :meth:`installed`; a loop checks it between steps, so a signal
    finishes the current step and the loop saves a checkpoint. A second signal stops at once."""

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

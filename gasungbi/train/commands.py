"""CLI: ``gasungbi train`` and ``gasungbi export-hf`` (a training checkpoint, sharded or not, in the
Hugging Face layout).

Training flags are the fields of :class:`~gasungbi.train.trainer.TrainConfig` (``--batch-size``,
``--lr``...); ``--config FILE`` gives their defaults and ``--set field=value`` overrides fields of the
model config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated

from gasungbi.errors import UserError
from gasungbi.flags import Flat, OutDir, Repeated, RunOrStep

STARTED = time.perf_counter()  # before torch is imported: ``train --time-budget`` counts from here

from gasungbi.train.trainer import TrainConfig  # noqa: E402

Overrides = Repeated


def with_model_overrides(cfg: TrainConfig, items: tuple[str, ...]) -> TrainConfig:
    """``--set FIELD=VALUE`` items (VALUE parsed as JSON when it is JSON) added to ``model_overrides``."""
    overrides = dict(cfg.model_overrides)
    for item in items:
        if "=" not in item:
            raise UserError(f"--set expects FIELD=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return dataclasses.replace(cfg, model_overrides=overrides)


def train_cmd(cfg: Annotated[TrainConfig, Flat] = TrainConfig(), set: Overrides = (), config: str | None = None) -> int:
    """Pretrain a model on token shards (also under torchrun: DDP or FSDP2).

    Args:
        cfg: the training run
        set: override a model config field, e.g. --set num_hidden_layers=2
        config: a JSON or TOML file of training fields; flags given here override it
    """
    from gasungbi.train.budget import short_budget_defaults
    from gasungbi.train.trainer import train

    cfg, changed = short_budget_defaults(cfg, TrainConfig())
    if changed:
        print(f"time budget {cfg.time_budget:g} min: short-budget defaults "
              f"{', '.join(f'{k}={v:g}' for k, v in changed.items())} (pass a flag to keep another value)")
    try:
        report = train(with_model_overrides(cfg, set), started=STARTED)
    except ValueError as e:
        raise UserError(str(e)) from None
    if report.get("checkpoint") is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    if report.get("val_bpb") is not None:
        print(f"step {report['step']}: val loss {report['val_loss']:.4f}, {report['val_bpb']:.4f} bits/byte, "
              f"{report['tokens_per_s']:,.0f} tokens/s, MFU {report['mfu']:.2%}, ${report['dollars']:.4f}")
    print(f"checkpoint: {report['checkpoint']}")
    return 0


def export_hf_cmd(run_or_step: RunOrStep, out: OutDir, overwrite: bool = False, merge_lora: bool = False,
                  base: str | None = None) -> int:
    """Write a training checkpoint in the Hugging Face layout (config.json, model.safetensors,
    tokenizer.json) that gasungbi and transformers load; reads the sharded checkpoints of torchrun runs,
    and with --merge-lora the adapters of a LoRA run, merged into their base.

    Args:
        run_or_step: a run directory (its latest checkpoint) or one of its step_N checkpoint directories
        out: the directory to write
        overwrite: replace what OUT already holds (never the run itself)
        merge_lora: the checkpoint holds LoRA adapters (a --lora-rank run): write their base with them merged
        base: with --merge-lora, the base checkpoint (default: the adapters' base_model_name_or_path)
    """
    from pathlib import Path

    from gasungbi.outputs import output_dir
    from gasungbi.train import lora
    from gasungbi.train.checkpoint import STATE_FILE, latest_checkpoint
    from gasungbi.train.sharded import export_hf

    output_dir(out, "OUT", inputs=[run_or_step] + ([base] if base else []), overwrite=overwrite)
    try:
        src = Path(run_or_step)
        step = src if (src / STATE_FILE).exists() or lora.is_adapter_dir(src) else latest_checkpoint(src)
        adapters = lora.is_adapter_dir(step)
        if adapters != merge_lora:
            raise UserError(f"{step} holds LoRA adapters: add --merge-lora to write them merged into their base"
                            if adapters else f"--merge-lora: {step or run_or_step} holds no LoRA adapters "
                            "(adapter_config.json)")
        if base is not None and not merge_lora:
            raise UserError("--base names the base of LoRA adapters: it goes with --merge-lora")
        path = lora.export_merged(step, out, base) if merge_lora else export_hf(run_or_step, out)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(f"wrote {path}")
    return 0

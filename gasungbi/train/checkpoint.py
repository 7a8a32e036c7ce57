"""Training checkpoints: a Hugging Face model directory plus ``training_state.pt``.

Layout of a run directory::

    run/
      step_000200/            config.json, model.safetensors, tokenizer.json, training_state.pt
      step_000400/
      latest                  text file naming the newest complete checkpoint
      metrics.jsonl, loss.png, report.json, report.md

A checkpoint is written to ``.step_N.tmp`` and renamed when complete, so a crash or a kill
never leaves a half-written checkpoint that ``latest`` points to; only the last ``keep`` are kept.
``training_state.pt`` holds our own tensors and plain Python values only, and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from gasungbi import atomic
from gasungbi.interop.hf import load_model, save_model
from gasungbi.model.transformer import Transformer

STATE_FILE = "training_state.pt"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: Transformer, training_state: dict,
                    tokenizer: str | os.PathLike | None = None, keep: int = 3) -> Path:
    """Write ``run_dir/step_{step}`` atomically, point ``latest`` at it, prune to ``keep``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        save_model(model, tmp, tokenizer=tokenizer)
        torch.save(training_state, tmp / STATE_FILE)

    final = atomic.write_dir(run_dir / f"step_{step:06d}", write)
    atomic.write_text(run_dir / "latest", final.name + "\n")
    ckpts = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.exists():
        path = run_dir / pointer.read_text().strip()
        if (path / STATE_FILE).exists():
            return path
    ckpts = sorted(p for p in run_dir.glob("step_*") if (p / STATE_FILE).exists())
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model in fp32 on ``device``, training state) of a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    model = load_model(path, device=device, dtype=torch.float32)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return model, state

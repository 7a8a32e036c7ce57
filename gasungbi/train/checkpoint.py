"""Training checkpoints: a Hugging Face model directory plus ``training_state.pt``.

Layout of a run directory::

    run/
      step_000200/            config.json, model.safetensors, tokenizer.json, training_state.pt
      step_000400/
      latest                  text file naming the newest complete checkpoint
      metrics.jsonl, loss.png, report.json, report.md

A LoRA run's checkpoint holds its adapters in PEFT's format (``adapter_config.json``,
``adapter_model.safetensors``: :mod:`gasungbi.train.lora`) in place of config.json and the model's
weights; its base is the checkpoint the run started from.

Under torchrun a checkpoint is sharded instead (:mod:`gasungbi.train.sharded`): ``shards/`` holds
what every rank wrote with ``torch.distributed.checkpoint``, beside config.json, tokenizer.json and
``training_state.pt`` (without the optimizer states, which are in the shards).

A checkpoint is written to ``.step_N.tmp`` and renamed when complete, so a crash or a kill
never leaves a half-written checkpoint that ``latest`` points to; only the last ``keep`` are kept.
``training_state.pt`` holds our own tensors and plain Python values only, and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from gasungbi import atomic
from gasungbi.interop.hf import TOKENIZER_FILES, load_model, save_model
from gasungbi.model.transformer import Transformer
from gasungbi.train import lora

STATE_FILE = "training_state.pt"


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: Transformer, training_state: dict,
                    tokenizer: str | os.PathLike | None = None, keep: int = 3) -> Path:
    """Write ``run_dir/step_{step}`` atomically (the model, or a LoRA run's adapters), point
    ``latest`` at it, prune to ``keep``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        if lora.adapted_modules(model):  # a LoRA run: its adapters (PEFT's files); the base is its init_from
            lora.save_adapters(model, tmp, tokenizer=tokenizer)
        else:
            save_model(model, tmp, tokenizer=tokenizer)
        torch.save(training_state, tmp / STATE_FILE)

    final = atomic.write_dir(run_dir / f"step_{step:06d}", write)
    publish(run_dir, final, keep)
    return final


def publish(run_dir: Path, final: Path, keep: int) -> None:
    """Point ``latest`` at the complete checkpoint ``final`` and prune the run to ``keep`` checkpoints."""
    atomic.write_text(run_dir / "latest", final.name + "\n")
    # prune to `keep`, oldest first, but never the checkpoint just written (`latest` names it) nor the
    # highest-numbered one: a rewound run (`latest` edited back) has checkpoints above the one it writes
    ckpts = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    kept = {final, ckpts[-1]}
    surplus = max(0, len(ckpts) - max(keep, len(kept)))
    for old in [p for p in ckpts if p not in kept][:surplus] if keep > 0 else []:
        shutil.rmtree(old)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None. ``latest`` names a checkpoint of this run:
    a ValueError when it names a path elsewhere (``../other_run/step_2``)."""
    run_dir = Path(run_dir)
    pointer = run_dir / "latest"
    if pointer.exists():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if name and (Path(name).name != name or name in (".", "..")):
            raise ValueError(f"{pointer} names {name!r}, which is not a checkpoint directory inside {run_dir}; "
                             "it should name one of the run's step_N directories")
        path = run_dir / name
        if name and (path / STATE_FILE).exists():
            return path
    ckpts = sorted(p for p in run_dir.glob("step_*") if (p / STATE_FILE).exists())
    return ckpts[-1] if ckpts else None


# what a run writes into its directory (train, sft, grpo); --overwrite removes exactly these
RUN_FILES = ("latest", "latest.tmp", "metrics.jsonl", "samples.txt", "report.json", "report.md", "loss.png",
             "config.json", "tb")


def holds_run(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` already holds a run: checkpoints, ``latest`` or ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and ((run_dir / "latest").exists() or (run_dir / "metrics.jsonl").exists()
                                 or any(run_dir.glob("step_*")))


# what a checkpoint directory holds (the Hugging Face layout, a run's training state, torchrun's shards)
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", STATE_FILE, "shards",
                    *TOKENIZER_FILES)


def holds_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a model checkpoint directory: config.json beside weights or a training
    state (a run directory's own config.json holds its settings, with no weights beside it)."""
    path = Path(path)
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or (path / STATE_FILE).exists()
                                                 or (path / "model.safetensors.index.json").exists())


def claim_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool, remove: bool = True,
                  inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Make ``run_dir`` ready for a run. A directory that holds an earlier run is refused (ValueError)
    unless ``resume`` (continue it) or ``overwrite`` (remove its checkpoints and logs first, when
    ``remove``: the main process of a distributed run), so a rerun never mixes into or prunes
    another run's checkpoints and metrics. A model checkpoint directory is not a run directory: it is
    refused unless ``overwrite`` (which removes its files). ``inputs`` (the checkpoint the run starts
    from) are refused as the run directory or inside it, whatever the flags: the run would write its
    config.json over one, or prune or remove it."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the output directory and --overwrite replaces it: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run directory")
    for src in inputs:
        source, target = Path(src).resolve(), run_dir.resolve()
        if source == target or target in source.parents:
            raise ValueError(f"the output directory {run_dir} {'is' if source == target else 'holds'} the checkpoint "
                             f"the run starts from ({src}), which the run would overwrite or prune: choose another "
                             "output directory")
    checkpoint = holds_checkpoint(run_dir)  # even with a `latest` of its own (DeepSpeed writes one)
    if checkpoint and not overwrite:
        raise ValueError(f"{run_dir} holds a model checkpoint (config.json and weights), not a run: a run writes its "
                         "own config.json and step_N checkpoints there; choose another output directory, or add "
                         "--overwrite to replace the checkpoint")
    if not checkpoint and (resume or not holds_run(run_dir)):
        return
    if not overwrite:
        raise ValueError(f"{run_dir} already holds a run (checkpoints, latest or metrics.jsonl): add --resume to "
                         "continue it or --overwrite to replace it, or choose another output directory")
    if remove:
        names = CHECKPOINT_FILES if checkpoint else RUN_FILES
        weights = run_dir.glob("*.safetensors") if checkpoint else ()
        for p in [*run_dir.glob("step_*"), *run_dir.glob(".step_*.tmp"), *(run_dir / f for f in names), *weights]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the rows of a ``metrics.jsonl`` up to ``step`` (those a resumed checkpoint already holds), so the
    steps replayed after a kill are not logged twice; a torn last line is dropped too."""
    path = Path(path)
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(line + "\n")
    atomic.write_text(path, "".join(rows))


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(model in fp32 on ``device``, training state) of a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    model = load_model(path, device=device, dtype=torch.float32)
    return model, load_training_state(path)


def load_training_state(path: str | os.PathLike) -> dict:
    """The ``training_state.pt`` of a checkpoint directory; a ValueError naming the file when it is
    not one a run wrote (empty, torn, not a state dict, or holding objects beyond tensors and plain
    values, which ``weights_only`` never unpickles)."""
    file = Path(path) / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, EOFError, RuntimeError... for a bad file
        why = "it is empty" if file.is_file() and file.stat().st_size == 0 else f"it does not load ({type(e).__name__})"
        raise ValueError(f"{file} is not a training state gasungbi can read: {why}") from None
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"{file} is not a training state gasungbi can read: {problem}")
    return state


def _state_problem(state) -> str:
    """What a loaded training state lacks of what every run reads back (step, history, generators,
    meter); '' when nothing."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        return f"its step is {state.get('step')!r}, not a step number"
    if not isinstance(state.get("history"), list):
        return "it has no history list"
    if not isinstance(state.get("rng"), dict) or not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "it has no random generator states"
    meter = state.get("meter")
    if not isinstance(meter, dict) or not all(isinstance(meter.get(k), (int, float)) for k in ("elapsed", "tokens")):
        return "it has no cost meter (elapsed, tokens)"
    return ""

"""Sharded training checkpoints under torchrun, with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own tensors into ``step_N/shards/`` (one ``__R_0.distcp`` file per rank and
DCP's ``.metadata``): FSDP2 shards as they are, the expert-parallel slices as DTensors sharded over
the ``ep`` dimension of the mesh and replicated over ``dp``, replicated tensors once (DCP spreads
them over the ranks). Nothing is gathered on one rank. On load DCP reads the pieces each rank's
tensors cover, so a checkpoint resumes under any layout: other world sizes, other EP sizes, with or
without FSDP, or in one process (no process group), where the tensors are the full ones.

The model's config.json and tokenizer.json sit beside the shards, so :func:`load_model` and
``gasungbi export-hf`` rebuild the model from the directory alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gasungbi import atomic
from gasungbi.config import read_config, to_hf_config
from gasungbi.interop import hf
from gasungbi.interop.hf import copy_tokenizer, save_model
from gasungbi.model.transformer import Transformer, build_model
from gasungbi.train import checkpoint as ckpt
from gasungbi.train import distributed as dist
from gasungbi.train.expert_parallel import gathered_model, shard_optimizer_state

SHARDS = "shards"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether checkpoint directory ``path`` holds DCP shards."""
    return (Path(path) / SHARDS / ".metadata").exists()


def _state(objective: nn.Module, optimizers: list, mesh) -> tuple[dict, list[str]]:
    """This rank's model and optimizer states as DCP saves and loads them (keys: ``model``,
    ``optimizer0``...), and the names of the expert parameters whose tensors there are DTensors."""
    state = {"model": get_model_state_dict(objective)}
    for i, opt in enumerate(optimizers):
        state[f"optimizer{i}"] = get_optimizer_state_dict(objective, opt)
    if mesh is None:
        return state, []
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from gasungbi.train.expert_parallel import expert_param_names

    names = expert_param_names(objective)
    placements = [Replicate(), Shard(0)]  # mesh (dp, ep): each slice replicated over dp

    for name in names:
        local = state["model"][name]
        for sd in _optimizer_states(state, name):  # moments and momentum too, not AdamW's scalar `step`
            sd["state"][name] = {  # a new dict: the old one is the optimizer's own
                k: DTensor.from_local(t, mesh, placements, run_check=False)
                if isinstance(t, torch.Tensor) and t.shape == local.shape else t
                for k, t in sd["state"][name].items()}
        state["model"][name] = DTensor.from_local(local, mesh, placements, run_check=False)
    return state, names


def _optimizer_states(state: dict, name: str) -> list[dict]:
    return [sd for key, sd in state.items() if key != "model" and name in sd["state"]]


def _local(state: dict, names: list[str]) -> None:
    """In place: the expert DTensors of :func:`_state` become this rank's slices again."""
    for name in names:
        state["model"][name] = state["model"][name].to_local()
        for sd in _optimizer_states(state, name):
            sd["state"][name] = {k: t.to_local() if hasattr(t, "to_local") else t for k, t in sd["state"][name].items()}


def save_checkpoint(run_dir: str | os.PathLike, step: int, objective: nn.Module, optimizers: list, mesh,
                    training_state: dict, is_main: bool, tokenizer: str | os.PathLike, keep: int = 3,
                    hf_model: Transformer | None = None) -> Path | None:
    """Write ``run_dir/step_{step}`` from every rank (collective): rank 0 prepares ``.step_N.tmp``,
    all ranks write their shards there, rank 0 adds ``training_state`` (without optimizer states),
    config.json and the tokenizer, renames it into place, points ``latest`` at it and prunes to
    ``keep``. ``hf_model`` (rank 0, the final checkpoint): also written in the Hugging Face layout.
    Returns the checkpoint's path on rank 0, None elsewhere."""
    run_dir = Path(run_dir)
    final = run_dir / f"step_{step:06d}"
    tmp = atomic.tmp_dir(final)
    if is_main:
        atomic.fresh_dir(tmp)
    torch.distributed.barrier()
    state, _ = _state(objective, optimizers, mesh)
    dcp.save(state, checkpoint_id=tmp / SHARDS)  # returns once every rank's files and the metadata are written
    if is_main:
        torch.save(training_state, tmp / ckpt.STATE_FILE)
        if hf_model is not None:
            save_model(hf_model, tmp, tokenizer=tokenizer)
        else:
            atomic.write_text(tmp / "config.json", json.dumps(to_hf_config(objective.model.config), indent=2) + "\n")
            copy_tokenizer(tokenizer, tmp)
        atomic.replace_dir(tmp, final)
        ckpt.publish(run_dir, final, keep)
    torch.distributed.barrier()  # nobody starts the next checkpoint before this one is in place
    return final if is_main else None


def load_checkpoint(path: str | os.PathLike, objective: nn.Module, optimizers: list, mesh) -> None:
    """Fill the model and optimizers of a run, built and wrapped for this layout (``mesh``: the
    expert-parallel mesh or None), from the sharded checkpoint ``path``. Collective under torchrun."""
    state, names = _state(objective, optimizers, mesh)
    dcp.load(state, checkpoint_id=Path(path) / SHARDS)
    _local(state, names)
    set_model_state_dict(objective, state["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(objective, opt, state[f"optimizer{i}"])


def save_run_checkpoint(run_dir: str | os.PathLike, step: int, objective: nn.Module, optimizers: list, mesh,
                        training_state: dict, info: dist.DistInfo, tokenizer: str | os.PathLike, keep: int,
                        hf_model: Transformer | None = None) -> Path | None:
    """A run's checkpoint in either layout. One process: the Hugging Face layout of ``hf_model`` (or
    of the gathered model) plus the full training state, optimizers keyed by parameter name. Under
    torchrun: :func:`save_checkpoint` (sharded; plus the Hugging Face layout of ``hf_model``, the
    final one). Collective under torchrun."""
    if info.enabled:
        return save_checkpoint(run_dir, step, objective, optimizers, mesh, training_state, info.is_main, tokenizer,
                               keep=keep, hf_model=hf_model)
    state = {**training_state, "optimizers": dist.full_optimizer_state(objective, optimizers)}
    model = hf_model if hf_model is not None else gathered_model(objective, objective.model.config, mesh, True)
    return ckpt.save_checkpoint(run_dir, step, model, state, tokenizer=tokenizer, keep=keep)


def load_run_checkpoint(path: str | os.PathLike, objective: nn.Module, optimizers: list, mesh,
                        training_state: dict) -> None:
    """Resume a run laid out for this process (``mesh``: expert parallelism or None) from ``path``:
    the weights and optimizers of a sharded checkpoint, or the optimizers of a one-process one
    (whose weights the caller loaded; full expert states sliced for EP). Collective under torchrun."""
    if is_sharded(path):
        return load_checkpoint(path, objective, optimizers, mesh)
    if mesh is not None:
        shard_optimizer_state(objective, training_state["optimizers"], mesh)
    dist.load_optimizer_state(objective, optimizers, training_state["optimizers"])


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Transformer:
    """The model (fp32) of a sharded checkpoint, read in this process alone."""
    path = Path(path)
    model = build_model(read_config(path), device=device)
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}  # keys as the Objective saved them
    dcp.load(state, checkpoint_id=path / SHARDS, no_dist=True)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["model"].items()})
    return model.eval()


def export_hf(run_or_step: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the checkpoint ``run_or_step`` (a run directory: its latest checkpoint; or a step
    directory) in the Hugging Face layout at ``out`` (replacing what is there, once written).
    FileNotFoundError when it holds none."""
    src = Path(run_or_step)
    step = src if (src / ckpt.STATE_FILE).exists() else ckpt.latest_checkpoint(src)
    if step is None:
        raise FileNotFoundError(f"{run_or_step} is neither a training checkpoint nor a run directory holding one")
    model = load_model(step) if is_sharded(step) else hf.load_model(step, dtype=torch.float32)
    return atomic.write_dir(Path(out).resolve(), lambda tmp: save_model(model, tmp, tokenizer=step))

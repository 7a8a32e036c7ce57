"""Data parallelism as a pass applied to the finished model: DDP or FSDP2, under ``torchrun``.

No home-made distributed layer: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, ``torch.distributed``
provides the process group (NCCL on CUDA, gloo on CPU), and the model is wrapped by
``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard`` (each block, then the root, as
torchtitan does). Checkpoints are sharded (:mod:`gasungbi.train.sharded`); the full states here
serve one-process checkpoints, validation, samples and the final Hugging Face checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, info: DistInfo, strategy: str, ignore: list[str] = ()) -> nn.Module:
    """``ddp``: replicate and all-reduce gradients; ``fsdp``: shard parameters, gradients and
    optimizer state (FSDP2 ``fully_shard`` per block, then the root). ``ignore``: names of
    parameters that DDP and FSDP leave alone (expert shards, reduced by the expert-parallel pass)."""
    if not info.enabled:
        return objective
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        if ignore:
            DDP._set_params_and_buffers_to_ignore_for_model(objective, list(ignore))
        return DDP(objective, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        model = objective.model
        ignored = {p for n, p in objective.named_parameters() if n in set(ignore)} or None
        for block in list(model.model.layers) + list(model.model.mtp):
            fully_shard(block, ignored_params=ignored)
        fully_shard(objective, ignored_params=ignored)
        return objective
    raise ValueError(f"unknown parallel strategy {strategy!r}; choose ddp or fsdp")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def full_model_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state on CPU, keys relative to the Transformer. Collective under FSDP."""
    sd = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def full_optimizer_state(objective: nn.Module, optimizers: list) -> list[dict]:
    """Full optimizer states keyed by parameter name (so they load under any world size)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(objective, opt, options=opts) for opt in optimizers]


def load_optimizer_state(objective: nn.Module, optimizers: list, states: list[dict]) -> None:
    opts = StateDictOptions(full_state_dict=True, strict=False)
    for opt, state in zip(optimizers, states):
        set_optimizer_state_dict(objective, opt, state, options=opts)

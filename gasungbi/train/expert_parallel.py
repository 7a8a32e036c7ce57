"""Expert parallelism as a pass applied to the finished model, under ``torchrun``.

``W`` processes form a ``(W/K, K)`` device mesh: along ``ep`` (K consecutive ranks) the routed
experts of every MoE layer are sharded, each rank owning E/K of them stacked as in
:class:`~gasungbi.model.moe.Experts`; along ``dp`` (the W/K ranks with the same EP rank) each shard
is replicated. :func:`apply_expert_parallel` swaps every ``Experts`` for an :class:`EPExperts`
holding its rank's slices; the model code stays single-device.

A forward (torchtitan's ``ExpertParallel`` token dispatcher, without its GPU kernels):
sort the token slots by expert, exchange the per-expert counts (one small ``all_to_all_single``),
send each slot to the rank owning its expert (``all_to_all_single`` with uneven splits; its
backward is the reverse exchange), run the local experts on what arrived (grouped products over
the stacked slices, as ``Experts``), send the results back, weight and combine them. Every rank
of an EP group must run the same number of MoE forwards (they all do in training: same batch
shapes, same model; generation stops only when every rank of the group is done:
``generate(..., group=...)``).

Gradients: the non-expert parameters are DDP or FSDP2 over all W ranks, with the expert shards
left out of both (``wrap(..., ignore=expert_param_names(...))``). An expert shard's gradient
already sums the contributions of the K ranks of its EP group (they arrive through the backward
exchange); :func:`reduce_expert_grads` sums it over the W/K replicas and divides by W, which is
DDP's (and FSDP's) mean over W ranks, so every gradient equals the single-process one on the
global batch. :func:`clip_grad_norm` computes the global norm from the replicated, FSDP-sharded
and expert-sharded gradients.

Checkpoints are sharded (:mod:`gasungbi.train.sharded`): every rank writes its expert slices as
DTensors over the mesh, and DCP reslices them for the layout that resumes. :func:`full_model_state`
all-gathers the expert shards for validation, samples and the final Hugging Face checkpoint;
:func:`shard_optimizer_state` slices the full optimizer state of a one-process checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from gasungbi.model.moe import Experts, expert_counts, grouped_swiglu

EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits; the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits  # reversed
        return _AllToAll.apply(grad.contiguous(), out_splits, in_splits, ctx.group), None, None, None


class EPExperts(nn.Module):
    """This rank's E/K routed experts of one MoE layer: gate/up (E/K, I, d), down (E/K, d, I).

    ``forward`` takes what :class:`~gasungbi.model.moe.Experts` takes (global expert ids) and returns
    the same (N, d) combination; the tokens of other ranks' experts travel there and back.
    """

    def __init__(self, experts: Experts, group, ep_rank: int, ep_size: int):
        super().__init__()
        e = experts.gate_proj.shape[0]
        if e % ep_size:
            raise ValueError(f"{e} routed experts cannot be split over expert-parallel size {ep_size}")
        self.n_experts, self.n_local, self.ep_size, self.group = e, e // ep_size, ep_size, group
        lo, hi = ep_rank * self.n_local, (ep_rank + 1) * self.n_local
        for name in EXPERT_PARAMS:
            setattr(self, name, nn.Parameter(getattr(experts, name).detach()[lo:hi].clone()))
        self.limit = experts.limit  # DeepSeek-V4's SwiGLU clamp

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, d), idx/weights (N, K) global expert ids, counts (E,) -> (N, d)."""
        counts = expert_counts(idx, self.n_experts, counts)
        k, K, L = idx.shape[1], self.ep_size, self.n_local
        order = idx.reshape(-1).argsort(stable=True)  # (N*k,) slots sorted by expert, hence by rank
        token = order // k
        xs = x[token]
        # how many slots of each local expert every rank sends me: recv[r, e]
        recv = torch.empty_like(counts).view(K, L)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        send_splits = counts.view(K, L).sum(1).tolist()
        recv_splits = recv.sum(1).tolist()
        got = _AllToAll.apply(xs, recv_splits, send_splits, self.group)  # grouped by source rank, then expert
        # regroup the arrivals by local expert: one group of rows each, one grouped product per projection
        local_ids = torch.arange(L, device=x.device).repeat(K)
        by_expert = torch.repeat_interleave(local_ids, recv.reshape(-1)).argsort(stable=True)
        offs = recv.sum(0).cumsum(0).to(torch.int32)  # (L,) where each local expert's rows end
        ys = grouped_swiglu(got[by_expert], self.gate_proj, self.up_proj, self.down_proj, offs, self.limit)
        back = torch.empty_like(ys).index_copy(0, by_expert, ys)  # source order again
        ys = _AllToAll.apply(back, send_splits, recv_splits, self.group)  # (N*k, d) in `order`
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        return ys.new_zeros(x.shape[0], ys.shape[1]).index_add_(0, token, ys)


def ep_mesh(world_size: int, ep_size: int, device_type: str):
    """The (dp, ep) device mesh: EP groups of ``ep_size`` consecutive ranks, replicated W/K times."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(f"expert_parallel={ep_size} must divide the {world_size} processes"
                         + (" (launch with torchrun --nproc_per_node=N, N a multiple of it)" if world_size == 1 else ""))
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world_size // ep_size, ep_size), mesh_dim_names=("dp", "ep"))


def apply_expert_parallel(model: nn.Module, mesh) -> list[str]:
    """Replace every :class:`Experts` of ``model`` by this rank's :class:`EPExperts` (in place).

    Returns the names of the replaced modules (relative to ``model``)."""
    group, ep_rank, ep_size = mesh["ep"].get_group(), mesh["ep"].get_local_rank(), mesh["ep"].size()
    names = [n for n, m in model.named_modules() if isinstance(m, Experts)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, EPExperts(getattr(parent, attr), group, ep_rank, ep_size))
    return names


def expert_param_names(module: nn.Module) -> list[str]:
    """Fully qualified names (relative to ``module``) of the sharded expert parameters."""
    return [f"{n}.{p}" for n, m in module.named_modules() if isinstance(m, EPExperts) for p in EXPERT_PARAMS]


def _expert_params(module: nn.Module) -> list[nn.Parameter]:
    return [getattr(m, p) for m in module.modules() if isinstance(m, EPExperts) for p in EXPERT_PARAMS]


def reduce_expert_grads(module: nn.Module, mesh) -> None:
    """Sum the expert gradients over the W/K replicas and divide by W (DDP's convention).

    A shard whose experts got no token has no gradient; it gets zeros, as the single-process
    stacked tensor does (so AdamW still steps it, and every replica joins the all-reduce)."""
    world = mesh.size()
    dp = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    for p in _expert_params(module):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if dp is not None:
            dist.all_reduce(p.grad, group=dp)
        p.grad.div_(world)


def clip_grad_norm(module: nn.Module, max_norm: float, mesh) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole model: replicated parameters counted once, FSDP shards
    summed over all ranks, expert shards over the EP group. Returns the total norm (before clipping)."""
    from torch.distributed.tensor import DTensor

    experts = {id(p) for p in _expert_params(module)}
    params = [p for p in module.parameters() if p.grad is not None]
    zero = torch.zeros((), device=params[0].device)
    replicated, fsdp_shards, ep_shards = zero.clone(), zero.clone(), zero.clone()
    for p in params:
        g = p.grad.detach()
        if isinstance(g, DTensor):  # FSDP2: this rank's shard of the gradient
            fsdp_shards += g.to_local().float().pow(2).sum()
        elif id(p) in experts:
            ep_shards += g.float().pow(2).sum()
        else:
            replicated += g.float().pow(2).sum()
    dist.all_reduce(ep_shards, group=mesh["ep"].get_group())
    if any(isinstance(p.grad, DTensor) for p in params):
        dist.all_reduce(fsdp_shards)
    total = (replicated + fsdp_shards + ep_shards).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for p in params:
        (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(coef)
    return total


def _gather_dim0(t: torch.Tensor, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def full_model_state(objective: nn.Module, mesh) -> dict[str, torch.Tensor]:
    """Full model state on CPU on rank 0, keys relative to the Transformer (experts gathered).
    Collective: every rank calls it."""
    from gasungbi.train.distributed import full_model_state as dense_state

    out = dense_state(objective)  # DDP: the whole (local) state on every rank; FSDP: full on rank 0
    group, size = mesh["ep"].get_group(), mesh["ep"].size()
    params = dict(objective.named_parameters())
    for name in expert_param_names(objective):
        full = _gather_dim0(params[name].detach(), group, size)
        if out:
            out[name.removeprefix("model.")] = full.cpu()
    return out


def gathered_model(objective: nn.Module, cfg, mesh, is_main: bool):
    """The whole model as a plain copy on CPU on the main process, None elsewhere: its full state
    (FSDP shards and, with the expert-parallel ``mesh``, expert slices gathered). Collective under
    torchrun: every rank must call it."""
    from gasungbi.model.transformer import from_state_dict
    from gasungbi.train.distributed import full_model_state as dense_state

    state = full_model_state(objective, mesh) if mesh is not None else dense_state(objective)
    return from_state_dict(cfg, state) if is_main else None


def shard_optimizer_state(objective: nn.Module, optim_states: list[dict], mesh) -> None:
    """In place: full expert optimizer tensors (from a checkpoint) become this rank's slices."""
    rank, size = mesh["ep"].get_local_rank(), mesh["ep"].size()
    params = dict(objective.named_parameters())
    for name in expert_param_names(objective):
        p = params[name]
        n = p.shape[0]
        for sd in optim_states:
            for key, t in sd["state"].get(name, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() == p.dim() and t.shape[0] == n * size:
                    sd["state"][name][key] = t[rank * n:(rank + 1) * n].clone()

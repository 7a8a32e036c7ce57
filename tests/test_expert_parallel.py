"""Expert parallelism under torchrun on CPU (gloo): ``--expert-parallel 2`` on 2 processes (EP 2)
and on 4 (EP 2 x DP 2, from the step-8 checkpoint of an EP 2 run), with DDP or FSDP2 for the
other parameters, follows the single-process run with the same global batch: per-step losses
within 1e-5 relative over 20 steps (measured 1.6e-7) and the same weights after training (measured
< 1e-6). A run moves between 1 process and EP 2 at a checkpoint: torchrun writes sharded
checkpoints (each rank its expert slices, nothing gathered), which resume on the same layout bit
for bit and on 1 process or EP 2 x DP 2 within the tolerance; ``gasungbi export-hf`` turns them
into the Hugging Face layout.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REL = 1e-5
STEPS = 20


def _run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gasungbi", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _args(code_shards, out, *extra):
    return ["train", "--data", str(code_shards), "--out-dir", str(out), "--model", "debug", "--batch-size", "8",
            "--seq-len", "32", "--max-steps", str(STEPS), "--warmup-steps", "2", "--eval-interval", "0",
            "--log-interval", "1", "--no-progress", "--sample-tokens", "2", "--device", "cpu", "--lr", "3e-3", *extra]


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in rows if "lm_loss" in r]


def _weights(out):
    path = Path(json.loads((Path(out) / "report.json").read_text())["checkpoint"])
    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def _close(ref, got):
    assert len(got) == len(ref) == STEPS
    worst = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
    assert worst < REL, (worst, ref, got)


@pytest.fixture(scope="module")
def single(code_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_single")
    _run(_args(code_shards, out))
    return _losses(out), _weights(out)


def _same_weights(out, ref_weights):
    weights = _weights(out)
    assert weights.keys() == ref_weights.keys()
    experts = [k for k in weights if ".mlp.experts." in k]
    assert len(experts) == 3 * 8 * 3  # debug: 3 MoE layers (one in MTP) x 8 experts x gate/up/down
    for k in weights:
        assert (weights[k] - ref_weights[k]).abs().max() < 1e-5, k


@pytest.mark.parametrize(("nproc", "parallel"), [(2, "ddp"), (2, "fsdp")])
def test_expert_parallel_matches_one_process(nproc, parallel, code_shards, single, tmp_path):
    """EP 2 on 2 processes; EP 2 x DP 2 on 4 is checked from a checkpoint below (4-2)."""
    _run(_args(code_shards, tmp_path, "--expert-parallel", "2", "--parallel", parallel), nproc=nproc)
    ref_losses, ref_weights = single
    _close(ref_losses, _losses(tmp_path))
    _same_weights(tmp_path, ref_weights)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device_count"] == nproc


def test_checkpoints_move_between_one_process_and_expert_parallel(code_shards, single, tmp_path):
    _run(_args(code_shards, tmp_path, "--expert-parallel", "2", "--parallel", "fsdp", "--stop-after", "8"), nproc=2)
    _run(_args(code_shards, tmp_path, "--resume", "--stop-after", "14"))
    _run(_args(code_shards, tmp_path, "--resume", "--expert-parallel", "2"), nproc=2)  # shards again
    _close(single[0], _losses(tmp_path))


@pytest.fixture(scope="module")
def sharded_run(code_shards, tmp_path_factory):
    """An uninterrupted EP 2 run on 2 processes with sharded checkpoints at steps 8, 16 and 20."""
    out = tmp_path_factory.mktemp("ep_sharded")
    _run(_args(code_shards, out, "--expert-parallel", "2", "--ckpt-interval", "8", "--keep-checkpoints", "3"), nproc=2)
    return out


def test_torchrun_writes_sharded_checkpoints(sharded_run, cli, tmp_path):
    import torch.distributed.checkpoint as dcp

    import gasungbi
    from gasungbi.interop.hf import load_model

    step = sharded_run / "step_000008"
    files = sorted(p.name for p in (step / "shards").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert not (step / "model.safetensors").exists() and (step / "config.json").exists()
    assert "optimizers" not in torch.load(step / "training_state.pt", weights_only=True)
    meta = dcp.FileSystemReader(step / "shards").read_metadata().state_dict_metadata
    for key in ("model.model.model.layers.1.mlp.experts.gate_proj",  # "model." + the Objective's name
                "optimizer0.state.model.model.layers.1.mlp.experts.up_proj.exp_avg"):
        assert [(c.offsets[0], c.sizes[0]) for c in meta[key].chunks] == [(0, 4), (4, 4)], key  # slices, never gathered
    final = sharded_run / "step_000020"  # the final checkpoint also has the Hugging Face layout
    assert (final / "model.safetensors").exists() and (final / "shards" / ".metadata").exists()

    r = cli("export-hf", sharded_run, tmp_path / "hf")  # the run's latest, read from its shards
    assert r.returncode == 0, r.stderr
    exported, trained = gasungbi.load_model(tmp_path / "hf"), load_model(final)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    for k, v in trained.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k


def test_export_hf_names_a_missing_checkpoint(tmp_path, cli, one_line_error):
    line = one_line_error(cli("export-hf", tmp_path, tmp_path / "hf"), "export-hf")
    assert str(tmp_path) in line and "neither a training checkpoint nor a run directory" in line


@pytest.mark.parametrize(("nproc", "ep"), [(2, 2), (1, 1), (4, 2)])
def test_sharded_checkpoint_resumes_on_any_layout(nproc, ep, sharded_run, single, code_shards, tmp_path):
    """Rewound to its step-8 checkpoint, the run continues: bit for bit on its own layout (EP 2),
    within the tolerance of the uninterrupted run on 1 process and on EP 2 x DP 2."""
    run = tmp_path / "run"
    shutil.copytree(sharded_run, run)
    (run / "latest").write_text("step_000008\n")
    _run(_args(code_shards, run, "--resume", *(["--expert-parallel", str(ep)] if ep > 1 else [])), nproc=nproc)
    if (nproc, ep) == (2, 2):
        assert _losses(run) == _losses(sharded_run)
    else:
        _close(single[0], _losses(run))
        _same_weights(run, single[1])
        assert json.loads((run / "report.json").read_text())["device_count"] == nproc


def _skewed_worker(rank: int, init_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from gasungbi.presets import get_preset
    from gasungbi.model.moe import Experts
    from gasungbi.train.expert_parallel import EPExperts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = get_preset("debug")
        torch.manual_seed(0)
        ref = Experts(cfg)
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.1)
        ep = EPExperts(ref, init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "ep"))["ep"].get_group(), rank, 2)
        torch.manual_seed(1 + rank)
        n, d = 6 + 3 * rank, cfg.hidden_size
        x = torch.randn(n, d, requires_grad=True)
        idx = torch.stack([torch.randperm(4)[:2] for _ in range(n)])  # only rank 0's experts: rank 1 gets none
        w = torch.rand(n, 2)
        counts = torch.bincount(idx.reshape(-1), minlength=cfg.n_routed_experts)
        y = ep(x, idx, w, counts)
        y_ref = ref(x, idx, w, counts)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad((y * g).sum(), x, retain_graph=True)
        y.mul(g).sum().backward()
        y_ref.mul(g).sum().backward()
        torch.testing.assert_close(gx, torch.autograd.grad((ref(x, idx, w, counts) * g).sum(), x)[0])
        for name in ("gate_proj", "up_proj", "down_proj"):  # shard grads = the sum over ranks of the full grads
            full = getattr(ref, name).grad.clone()
            dist.all_reduce(full)
            grad = getattr(ep, name).grad  # None on rank 1: no token reached its experts
            torch.testing.assert_close(torch.zeros_like(full[:4]) if grad is None else grad, full[4 * rank:4 * rank + 4])
    finally:
        dist.destroy_process_group()


def test_exchange_with_a_rank_that_receives_nothing(tmp_path):
    """Forward and backward of EPExperts equal the single-device Experts when every token goes to
    rank 0's experts (rank 1 sends and receives no slot), with unequal token counts per rank."""
    import torch.multiprocessing as mp

    mp.spawn(_skewed_worker, args=(str(tmp_path / "init"),), nprocs=2)

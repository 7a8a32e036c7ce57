"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process loss trajectory
with the same global batch, and a checkpoint written by 2 processes resumes on 1.

Tolerance: 2e-3 nats on every logged step over 6 steps. The processes see the same global batch,
so the only difference is the order of floating-point reductions (gradient all-reduce, sharded
optimizer updates), which grows slowly through the Adam updates.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


TOL = 2e-3


def _args(code_shards, out, steps=6, *extra):
    return ["train", "--data", str(code_shards), "--out-dir", str(out), "--model", "debug", "--batch-size", "8",
            "--seq-len", "32", "--max-steps", str(steps), "--warmup-steps", "2", "--eval-interval", "0",
            "--log-interval", "1", "--no-progress", "--sample-tokens", "2", "--device", "cpu", "--lr", "3e-3",
            "--eval-batches", "3", *extra]  # an odd count: 2 processes must still run as many forwards each


def _run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "gasungbi", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gasungbi", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["lm_loss"] for r in rows if "lm_loss" in r]


@pytest.fixture(scope="module")
def single(code_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    _run(_args(code_shards, out))
    return _losses(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, code_shards, single, tmp_path):
    _run(_args(code_shards, tmp_path, 6, "--parallel", strategy), nproc=2)
    multi = _losses(tmp_path)
    assert len(multi) == len(single) == 6
    assert max(abs(a - b) for a, b in zip(single, multi)) < TOL, (single, multi)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device_count"] == 2


def test_checkpoint_from_two_processes_resumes_on_one(code_shards, single, tmp_path):
    _run(_args(code_shards, tmp_path, 6, "--parallel", "fsdp", "--stop-after", "3"), nproc=2)
    assert json.loads((tmp_path / "report.json").read_text())["step"] == 3
    _run(_args(code_shards, tmp_path, 6, "--resume"))
    resumed = _losses(tmp_path)
    assert len(resumed) == 6  # 3 logged by the 2-process run, 3 after resuming on 1
    assert max(abs(a - b) for a, b in zip(single, resumed)) < TOL, (single, resumed)

"""GRPO's arithmetic, a GRPO run that raises a reward, resume, distillation (checkpoint and HTTP
teacher) and the eval-tasks command."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from gasungbi import build_model, get_preset, save_model
from gasungbi.data.tokenizer import save_tokenizer, train_tokenizer
from gasungbi.data.conventions import CHAT_TEMPLATE
from gasungbi.post.distill import DistillConfig, distill
from gasungbi.post.grpo import GRPOConfig, completion_logprobs, group_advantages, grpo, grpo_loss

SEVENS = "tests.test_grpo:sevens_reward"


def sevens_reward(task, text):
    """A reward a random model can learn fast: the share of '7' characters in the completion."""
    return text.count("7") / max(len(text), 1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    docs = [f"What is {a} + {b}? <answer>{a + b}</answer> 777" for a in range(40) for b in range(10)]
    tok = train_tokenizer(docs, 300)
    save_tokenizer(tok, root / "tok", chat_template=CHAT_TEMPLATE)
    cfg = get_preset("debug").replace(vocab_size=tok.get_vocab_size(), initializer_range=0.1)
    save_model(build_model(cfg, seed=0), root / "ckpt", tokenizer=root / "tok")
    return root / "ckpt"


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r)
    # centered +-0.5, unbiased std sqrt(1/3)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / ((1 / 3) ** 0.5 + 1e-4), atol=1e-5)
    assert torch.equal(a[1], torch.zeros(4))  # a zero-variance group teaches nothing
    assert torch.allclose(group_advantages(r, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_loss_gradient_direction_clip_and_kl():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_()
    old = logp.detach().clone()
    mask = torch.ones(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, old, None, mask, adv, 0.2, 0.0, "grpo", 2)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()  # descent raises the good, lowers the bad
    assert stats["clip_frac"] == 0
    # far outside the clip range with a positive advantage: no gradient
    far = (old + 1.0).requires_grad_()
    loss, stats = grpo_loss(far, old, None, mask, torch.tensor([1.0, 1.0]), 0.2, 0.0, "grpo", 2)
    loss.backward()
    assert torch.equal(far.grad, torch.zeros_like(far)) and stats["clip_frac"] == 1.0
    # k3 KL: zero when equal to the reference, positive otherwise
    _, s0 = grpo_loss(old, old, old, mask, adv, 0.2, 0.1, "grpo", 2)
    _, s1 = grpo_loss(old, old, old - 0.5, mask, adv, 0.2, 0.1, "grpo", 2)
    assert s0["kl"] == pytest.approx(0.0) and s1["kl"] > 0


def test_k3_gradient_is_reverse_kl_and_the_corrected_k3_is_forward_kl():
    """Exact expectations: pi_old = (1/2, 1/4, 1/8, 1/8), so 8 one-token completions [0,0,0,0,1,1,2,3]
    weigh each token by its probability and the loss's mean is E_old[.] exactly."""
    tokens = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    old = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))
    ref = torch.log_softmax(torch.tensor([0.3, -0.2, 1.0, 0.1]), -1)
    mask, adv = torch.ones(8, 1), torch.zeros(8)

    def kl_loss(theta, estimator):
        logp = torch.log_softmax(theta, -1)[tokens][:, None]
        loss, stats = grpo_loss(logp, old[tokens][:, None], ref[tokens][:, None], mask, adv, 0.2, 1.0, "grpo", 1,
                                kl_estimator=estimator)
        grad, = torch.autograd.grad(loss, theta)
        return loss, grad, stats

    def exact(theta, forward):  # KL(pi || ref) or KL(ref || pi), and its gradient
        lp = torch.log_softmax(theta, -1)
        kl = (lp.exp() * (lp - ref)).sum() if forward else (ref.exp() * (ref - lp)).sum()
        return kl, torch.autograd.grad(kl, theta)[0]

    # pi_theta has moved away from pi_old (as after one of several updates)
    theta = torch.tensor([0.1, 0.4, -0.3, 0.2], requires_grad=True)
    loss, grad, stats = kl_loss(theta, "k3_corrected")
    kl, kl_grad = exact(theta, forward=True)
    assert loss.item() == pytest.approx(kl.item(), rel=1e-5) and stats["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert torch.allclose(grad, kl_grad, atol=1e-6)
    # plain k3 on pi_theta = pi_old: the value is KL(pi || ref), the gradient that of KL(ref || pi)
    theta = old.clone().requires_grad_()
    loss, grad, _ = kl_loss(theta, "k3")
    assert loss.item() == pytest.approx(exact(theta, forward=True)[0].item(), rel=1e-5)
    assert torch.allclose(grad, exact(theta, forward=False)[1], atol=1e-6)
    assert not torch.allclose(grad, exact(theta, forward=True)[1], atol=1e-3)
    assert torch.allclose(kl_loss(theta, "k3_corrected")[1], exact(theta, forward=True)[1], atol=1e-6)


def test_completion_logprobs_match_a_direct_forward(ckpt):
    from gasungbi import load_model
    model = load_model(ckpt)
    prompts, completions = [[0, 5, 6], [0, 7]], [[8, 9], [10, 11, 12]]
    logp, mask = completion_logprobs(model, prompts, completions)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[0, 7, 10, 11, 12]])), -1)[0]
    want = [full[1, 10], full[2, 11], full[3, 12]]
    assert torch.allclose(logp[1], torch.stack(want), atol=1e-5)


def test_logprobs_are_those_of_the_sampling_temperature(ckpt, tmp_path, monkeypatch):
    """Rollouts sampled at temperature T: pi_old, pi_ref and pi_theta are all log_softmax(logits / T)."""
    from gasungbi import load_model
    import gasungbi.post.grpo as grpo_module
    model = load_model(ckpt)
    prompts, completions = [[0, 5, 6], [0, 7]], [[8, 9], [10, 11, 12]]
    logp, _ = completion_logprobs(model, prompts, completions, temperature=0.5)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 7, 10, 11, 12]]))[0]
    want = torch.stack([torch.log_softmax(logits[i] / 0.5, -1)[t] for i, t in ((1, 10), (2, 11), (3, 12))])
    assert torch.allclose(logp[1], want, atol=1e-5)
    assert not torch.allclose(logp[1], torch.log_softmax(logits[1:4], -1)[[0, 1, 2], [10, 11, 12]], atol=1e-3)
    # the run computes every log-probability (old, reference, update) at its sampling temperature
    seen = []

    def spy(model, prompts, completions, temperature=1.0):
        seen.append(temperature)
        return completion_logprobs(model, prompts, completions, temperature)

    monkeypatch.setattr(grpo_module, "completion_logprobs", spy)
    grpo(GRPOConfig(init_from=str(ckpt), out_dir=str(tmp_path / "t"), reward=SEVENS, steps=1, prompts_per_step=2,
                    group_size=2, max_new_tokens=4, eval_tasks=1, ckpt_interval=0, progress=False, temperature=0.7,
                    beta=0.1))
    assert seen == [0.7, 0.7, 0.7]


def test_grpo_raises_a_learnable_reward_and_resumes(ckpt, tmp_path):
    base = dict(init_from=str(ckpt), task="arithmetic", difficulty=2, reward=SEVENS, prompts_per_step=4,
                group_size=6, max_new_tokens=8, lr=3e-3, eval_tasks=8, ckpt_interval=3, progress=False, seed=1)
    report = grpo(GRPOConfig(out_dir=str(tmp_path / "a"), steps=12, **base))
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["reward"] for r in rows[:3]) / 3, sum(r["reward"] for r in rows[-3:]) / 3
    assert last > first + 0.1, (first, last)
    assert {"reward", "accuracy", "zero_variance_groups", "kl", "response_length", "sample"} <= set(rows[0])
    assert {"accuracy", "ci95", "n"} <= set(report["before"]) and report["after"]["n"] == 8
    # resume: a run stopped at step 3 continues to 12 and ends with the same weights
    grpo(GRPOConfig(out_dir=str(tmp_path / "b"), steps=3, **base))
    resumed = grpo(GRPOConfig(out_dir=str(tmp_path / "b"), steps=12, resume=True, **base))
    from safetensors.torch import load_file
    wa = load_file(f"{report['checkpoint']}/model.safetensors")
    wb = load_file(f"{resumed['checkpoint']}/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_grpo_time_budget_stops_at_a_step_boundary_and_stays_stopped(ckpt, tmp_path):
    cfg = GRPOConfig(init_from=str(ckpt), out_dir=str(tmp_path / "t"), reward=SEVENS, steps=5, prompts_per_step=2,
                     group_size=2, max_new_tokens=4, eval_tasks=2, ckpt_interval=0, progress=False,
                     time_budget=1e-4)  # 6 ms: spent by the first step, which always runs
    report = grpo(cfg)
    assert report["steps"] == 1 and report["planned_steps"] == 5 and report["time_budget"] == 1e-4
    assert report["checkpoint"].endswith("step_000001") and report["before"]["elapsed_s"] >= 0
    again = grpo(dataclasses.replace(cfg, resume=True))  # a rerun finds the budget spent: no more steps
    assert again["steps"] == 1 and len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="time_budget must be > 0"):
        GRPOConfig(init_from=str(ckpt), time_budget=0).validate()


def test_distill_from_checkpoint_and_from_an_endpoint(ckpt, tmp_path):
    r = distill(DistillConfig(teacher=str(ckpt), student=str(ckpt), out_dir=str(tmp_path / "c"), prompts=6,
                              samples_per_prompt=2, reward="format", min_reward=0.0, sft_steps=2, batch_size=2,
                              seq_len=64, max_new_tokens=6))
    assert r["sampled"] == 12 and r["kept"] == 12 and r["student"]["step"] == 2

    keys = []

    class Teacher(BaseHTTPRequestHandler):
        def do_POST(self):
            keys.append(self.headers["Authorization"])
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            q = body["messages"][-1]["content"]
            a, b = q.split("What is ")[1].split("?")[0].split(" ")[::2]
            op = q.split("What is ")[1].split(" ")[1]
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            # right answers for even operands, wrong otherwise: the filter must keep exactly those
            text = f"<think>{a}{op}{b}</think><answer>{value if int(a) % 2 == 0 else value + 1}</answer>"
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = distill(DistillConfig(teacher=f"http://127.0.0.1:{server.server_port}/v1", student=str(ckpt),
                                  out_dir=str(tmp_path / "e"), prompts=10, samples_per_prompt=1, sft_steps=2,
                                  batch_size=2, seq_len=64, api_key="k3y"))
    finally:
        server.shutdown()
    assert keys == ["Bearer k3y"] * 10  # the openai client sends the key
    kept = [json.loads(l) for l in (tmp_path / "e" / "traces.jsonl").read_text().splitlines()]
    assert r["kept"] == len(kept) and 0 < len(kept) < 10
    for conv in kept:
        a = int(conv["messages"][0]["content"].split("What is ")[1].split(" ")[0])
        assert a % 2 == 0


def test_eval_tasks_cli(ckpt):
    r = subprocess.run([sys.executable, "-m", "gasungbi", "eval-tasks", str(ckpt), "--n", "6", "--k", "2",
                        "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["n_tasks"] == 6 and 0 <= d["pass@1"] <= d["pass@2"] <= 1 and len(d["ci95"]) == 2
    bad = subprocess.run([sys.executable, "-m", "gasungbi", "eval-tasks", str(ckpt), "--task", "chess"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown task family 'chess'" in bad.stderr


def _torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gasungbi",
           *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _grpo_args(ckpt, out, *extra):
    return ["grpo", "--init-from", str(ckpt), "--out-dir", str(out), "--reward", SEVENS, "--prompts-per-step", "4",
            "--group-size", "4", "--max-new-tokens", "8", "--lr", "3e-3", "--steps", "4", "--eval-tasks", "4",
            "--no-progress", "--seed", "1", *extra]


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _final_weights(out):
    from safetensors.torch import load_file
    return load_file(f"{json.loads((out / 'report.json').read_text())['checkpoint']}/model.safetensors")


def test_grpo_under_torchrun_with_expert_parallel(ckpt, tmp_path):
    """GRPO on 2 processes, each sampling half of a step's groups: with the routed experts sharded
    over both (EP 2), stopped at step 2 (a sharded checkpoint) and resumed to step 4, the
    rollouts, rewards and weights are those of an uninterrupted plain-DDP run, the experts only
    placed differently."""
    import torch.distributed.checkpoint as dcp

    _torchrun(*_grpo_args(ckpt, tmp_path / "ddp"))
    _torchrun(*_grpo_args(ckpt, tmp_path / "ep", "--expert-parallel", "2", "--steps", "2"))
    meta = dcp.FileSystemReader(tmp_path / "ep" / "step_000002" / "shards").read_metadata().state_dict_metadata
    chunks = meta["model.model.model.layers.1.mlp.experts.gate_proj"].chunks  # written by the rank that owns them
    assert [(c.offsets[0], c.sizes[0]) for c in chunks] == [(0, 4), (4, 4)]
    _torchrun(*_grpo_args(ckpt, tmp_path / "ep", "--expert-parallel", "2", "--resume"))
    ddp, ep = _rows(tmp_path / "ddp"), _rows(tmp_path / "ep")
    assert [r["step"] for r in ep] == [1, 2, 3, 4]
    assert [r["sample"] for r in ep] == [r["sample"] for r in ddp]
    assert [r["reward"] for r in ep] == [r["reward"] for r in ddp]
    wd, we = _final_weights(tmp_path / "ddp"), _final_weights(tmp_path / "ep")
    assert wd.keys() == we.keys() and any(".mlp.experts." in k for k in we)
    assert all((wd[k] - we[k]).abs().max() < 1e-5 for k in wd)
    report = json.loads((tmp_path / "ep" / "report.json").read_text())
    assert report["device_count"] == 2 and report["after"]["n"] == 4


def test_grpo_names_a_bad_layout(ckpt, tmp_path, monkeypatch):
    """Prompts that do not split into whole groups per process, or EP that does not divide them: refused."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="prompts_per_step=3 must be divisible by the 2 processes"):
        grpo(GRPOConfig(init_from=str(ckpt), out_dir=str(tmp_path / "run"), prompts_per_step=3))
    with pytest.raises(ValueError, match="expert_parallel=4 must divide the 2 processes"):
        grpo(GRPOConfig(init_from=str(ckpt), out_dir=str(tmp_path / "run"), expert_parallel=4))
    assert not (tmp_path / "run").exists()

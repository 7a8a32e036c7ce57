"""Distillation the R1 way (DeepSeek-R1 Sec. 2.4): sample reasoning traces from a teacher, keep the
ones a reward accepts (rejection sampling), and SFT a smaller student on them.

The teacher is one of our checkpoints (sampled with our engine) or any OpenAI-compatible
endpoint (``http://host:port/v1``, e.g. ``gasungbi serve`` or vLLM), asked through
``/v1/chat/completions`` with the ``openai`` client (which retries failed calls).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gasungbi.gym.rewards import load_reward
from gasungbi.gym.tasks import make_split, render_task_prompt


@dataclass
class DistillConfig:
    """A distillation run: rejection-sampled traces from a teacher, then SFT of the student."""

    teacher: str = ""  # teacher checkpoint, or an OpenAI-compatible URL (http://host:port/v1)
    teacher_model: str = "gasungbi"  # model name sent to an endpoint
    api_key: str | None = None  # the endpoint's API key (default: $OPENAI_API_KEY, else none)
    retries: int = 2  # retries of a failed endpoint call (the openai client's, with backoff)
    student: str = ""  # the checkpoint the student starts from (it brings the tokenizer)
    out_dir: str = "runs/distill"  # run directory: traces.jsonl and the student's SFT run
    task: str = "arithmetic"  # a gym task family
    difficulty: int = 2  # task difficulty
    reasoning: bool = True  # ask for <think>...</think><answer>...</answer>
    prompts: int = 200  # training-split tasks to ask the teacher
    samples_per_prompt: int = 4  # teacher samples per task
    temperature: float = 0.8  # the teacher's sampling temperature
    max_new_tokens: int = 64  # longest teacher completion
    reward: str = "accuracy+format"  # reward that filters the traces (name or module:function)
    min_reward: float = 1.0  # keep traces whose reward reaches this
    sft_steps: int = 100  # SFT steps of the student
    batch_size: int = 8  # SFT sequences per step
    seq_len: int = 128  # SFT sequence length
    lr: float = 1e-3  # SFT learning rate
    seed: int = 0  # seed of the task draw and the sampler
    device: str = "cpu"  # cpu, cuda or cuda:N
    overwrite: bool = False  # replace the traces and student run already in out_dir; without it, they are refused


def _teacher_from_checkpoint(cfg: DistillConfig):
    from gasungbi.data.conventions import Conventions
    from gasungbi.infer.generate import generate
    from gasungbi.infer.sampling import SamplingParams
    from gasungbi.interop.hf import load_model

    model = load_model(cfg.teacher, device=cfg.device)
    conv = Conventions.load(cfg.teacher)  # the teacher's chat template and stops

    def sample(messages: list[list[dict]], seed: int) -> list[str]:
        ids = [conv.chat_ids(m, content_as_text=False) for m in messages]
        outs = generate(model, ids, max_new_tokens=cfg.max_new_tokens, tokenizer=conv.tokenizer,
                        stop_tokens=conv.stop_ids,
                        sampling=SamplingParams(temperature=cfg.temperature, seed=seed))
        return [o.text or "" for o in outs]

    return sample


def _teacher_from_endpoint(cfg: DistillConfig):
    import openai

    client = openai.OpenAI(base_url=cfg.teacher, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                           max_retries=cfg.retries, timeout=300)

    def sample(messages: list[list[dict]], seed: int) -> list[str]:
        texts = []
        for i, m in enumerate(messages):
            try:
                r = client.chat.completions.create(model=cfg.teacher_model, messages=m, seed=seed + i,
                                                   max_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
                texts.append(r.choices[0].message.content or "")
            except (openai.OpenAIError, IndexError, AttributeError) as e:
                raise ValueError(f"teacher endpoint {cfg.teacher} failed: {e}") from None
        return texts

    return sample


def collect_traces(cfg: DistillConfig) -> tuple[Path, dict[str, Any]]:
    """Sample, filter by reward, write ``out_dir/traces.jsonl`` in the SFT messages format."""
    sample = (_teacher_from_endpoint if cfg.teacher.startswith(("http://", "https://")) else _teacher_from_checkpoint)(cfg)
    reward = load_reward(cfg.reward)
    tasks = make_split(cfg.task, cfg.prompts, cfg.difficulty, seed=cfg.seed, split="train")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "traces.jsonl"
    kept = total = 0
    with open(path, "w") as f:
        for r in range(cfg.samples_per_prompt):
            messages = [render_task_prompt(t, cfg.reasoning) for t in tasks]
            for task, msgs, text in zip(tasks, messages, sample(messages, cfg.seed * 1000 + r)):
                total += 1
                if reward(task, text) >= cfg.min_reward:
                    kept += 1
                    f.write(json.dumps({"messages": msgs + [{"role": "assistant", "content": text}]}) + "\n")
    return path, {"sampled": total, "kept": kept, "acceptance": kept / max(total, 1)}


def _check_student(path: str) -> None:
    """The student loads (config, weights, tokenizer and chat template), or a ValueError naming it."""
    from gasungbi.data.conventions import Conventions
    from gasungbi.interop.hf import load_model

    if not Path(path).is_dir():
        raise ValueError(f"--student {path}: no such checkpoint directory")
    Conventions.load(path)
    load_model(path)  # the student SFT loads it again; this copy is dropped here


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Collect accepted traces from the teacher, then SFT the student on them."""
    from gasungbi.train.checkpoint import holds_run
    from gasungbi.post.sft import sft
    from gasungbi.train.trainer import TrainConfig

    if not cfg.teacher or not cfg.student:
        raise ValueError("distill needs a teacher (checkpoint or endpoint URL) and a student checkpoint")
    out = Path(cfg.out_dir)
    if not cfg.overwrite and ((out / "traces.jsonl").exists() or holds_run(out / "student")):
        raise ValueError(f"{out} already holds a distillation run (traces.jsonl, student/): add --overwrite to "
                         "replace it, or choose another --out-dir")
    _check_student(cfg.student)  # before minutes of sampling, not after
    traces, stats = collect_traces(cfg)
    if stats["kept"] < 2:
        raise ValueError(f"the teacher produced {stats['kept']} accepted traces out of {stats['sampled']}: "
                         "nothing to distill (lower min_reward, raise samples_per_prompt, or use a stronger teacher)")
    report = sft(TrainConfig(init_from=cfg.student, data=str(traces), out_dir=str(Path(cfg.out_dir) / "student"),
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_steps=cfg.sft_steps, lr=cfg.lr,
                             warmup_steps=max(1, cfg.sft_steps // 10), eval_interval=0, device=cfg.device,
                             seed=cfg.seed, progress=False, overwrite=cfg.overwrite))
    return {"traces": str(traces), **stats, "student": report}

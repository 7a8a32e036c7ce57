"""Cold-start SFT data from the gym (DeepSeek-R1 Sec. 2.3.1): short worked answers in the R1
format, so that a small pretrained model learns the ``<think>...</think><answer>...</answer>``
shape before GRPO rewards it for being right.

The traces are programmatic and short: arithmetic restates the operation, countdown shows the
expression that reaches the target, sort lists the numbers it is given. They teach the format and
the task; GRPO then has to improve the correctness.
"""

from __future__ import annotations

import json
from pathlib import Path

from gasungbi.gym.tasks import Task, make_split, render_task_prompt


def worked_answer(task: Task) -> str:
    """The assistant turn for ``task``: a short thought and the correct answer, in the R1 format."""
    m = task.meta
    if task.family in ("arithmetic", "addition"):
        thought = f"{m['a']} {m['op']} {m['b']}"
    elif task.family == "countdown":
        thought = f"{task.answer} = {m['target']}"
    else:
        thought = ", ".join(map(str, m.get("numbers", [])))
    return f"<think>{thought}</think><answer>{task.answer}</answer>"


def cold_start_conversations(family: str, n: int, difficulty: int, seed: int = 0) -> list[list[dict]]:
    """``n`` train-split tasks with their worked answers, as chat conversations."""
    return [render_task_prompt(t, reasoning=True) + [{"role": "assistant", "content": worked_answer(t)}]
            for t in make_split(family, n, difficulty, seed=seed, split="train")]


def write_jsonl(conversations: list[list[dict]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    return path

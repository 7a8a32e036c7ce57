"""Cold-start SFT data from the gym (DeepSeek-R1 Sec. 2.3.1): short worked answers in the R1
format, so that a small pretrained model learns the ``<think>...</think><answer>...</answer>``
shape before GRPO rewards it for being right.

The traces are programmatic and short. Addition (``+`` in either family) works the columns from the
units up, with the carry: ``37 + 85`` -> ``7+5=12, 3+8+1=12``, then the answer ``122`` (a scratchpad,
Nye et al. 2021, "Show Your Work"). Each step is a one-digit sum, so a 10M-parameter model learns it
smoothly: from one pretrained speedrun checkpoint, 450 SFT steps reached 0.973 greedy accuracy on 300
held-out two-digit additions with this trace, against 0.060 when the thought only restated the sum
(the earlier trace, whose loss sat on a plateau and then dropped at a step that varied from run to
run). Subtraction and multiplication still restate the operation, countdown shows the expression
that reaches the target, sort lists the numbers it is given. The traces teach the format and the
procedure; GRPO then has to improve the correctness.
"""

from __future__ import annotations

import json
from pathlib import Path

from gasungbi.gym.tasks import Task, make_split, render_task_prompt


def worked_answer(task: Task) -> str:
    """The assistant turn for ``task``: a short thought and the correct answer, in the R1 format."""
    m = task.meta
    if task.family in ("arithmetic", "addition") and m["op"] == "+":
        thought = column_sums(m["a"], m["b"])
    elif task.family == "arithmetic":
        thought = f"{m['a']} {m['op']} {m['b']}"
    elif task.family == "countdown":
        thought = f"{task.answer} = {m['target']}"
    else:
        thought = ", ".join(map(str, m.get("numbers", [])))
    return f"<think>{thought}</think><answer>{task.answer}</answer>"


def column_sums(a: int, b: int) -> str:
    """The column-by-column working of ``a + b`` (non-negative), units first: ``7+5=12, 3+8+1=12``."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (int(d[i]) if i < len(d) else 0 for d in (da, db))
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return ", ".join(steps)


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

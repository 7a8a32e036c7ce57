"""Held-out task accuracy on the reasoning gym: pass@1, pass@k, and a confidence interval.

Free of torch: :func:`evaluate_tasks` takes a ``generate_fn(prompts, n, seed) -> completions`` that
the caller wires to a model (``gasungbi eval-gym`` wires it to the inference engine).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Sequence

from gasungbi.gym.rewards import RewardFn, accuracy_reward, load_reward
from gasungbi.gym.tasks import Task, render_task_prompt

GenerateFn = Callable[[list[str], int, int], list[list[str]]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples is correct, estimated without bias from n samples
    of which c are correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, arXiv:2107.03374, eq. 1),
    computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)`` to avoid huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% for z=1.96); sound near 0 and 1, unlike
    p +- z*sqrt(p(1-p)/n). ``n=0`` gives (0, 1)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def paired_gain(before: Sequence[float], after: Sequence[float], z: float = 1.96) -> dict:
    """The change in accuracy between two evaluations of the same tasks (per-task 0/1 outcomes in
    the same order): ``gain`` = after - before, ``ci95`` by Newcombe's hybrid score interval for a
    paired difference (Stat. Med. 1998, method 10: Wilson intervals of both marginals, combined with
    the phi correlation of the pairs), and McNemar's exact two-sided p-value on the discordant pairs
    (``gained``: wrong before, right after; ``lost``: the reverse)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_gain needs two equally long, non-empty outcome lists, got {len(before)}, {len(after)}")
    n = len(before)
    a = sum(1 for x, y in zip(before, after) if x and y)
    gained = sum(1 for x, y in zip(before, after) if not x and y)
    lost = sum(1 for x, y in zip(before, after) if x and not y)
    d = n - a - gained - lost
    p1, p2 = (a + gained) / n, (a + lost) / n  # after, before
    l1, u1 = wilson_interval(a + gained, n, z)
    l2, u2 = wilson_interval(a + lost, n, z)
    den = (a + gained) * (lost + d) * (a + lost) * (gained + d)
    phi = (a * d - gained * lost) / math.sqrt(den) if den else 0.0
    lo = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    m = gained + lost
    p_value = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(gained, lost) + 1)) / 2 ** m) if m else 1.0
    gain = p1 - p2
    return {"n": n, "before": p2, "after": p1, "gain": gain, "ci95": [max(-1.0, gain - lo), min(1.0, gain + hi)],
            "gained": gained, "lost": lost, "mcnemar_p": p_value}


def evaluate_tasks(generate_fn: GenerateFn, tasks: Sequence[Task], k: int = 1, n: int | None = None,
                   reward: RewardFn | str = accuracy_reward, reasoning: bool = True, seed: int = 0,
                   threshold: float = 1.0) -> dict:
    """Score ``n`` (default ``k``) completions per task; a completion is correct when
    ``reward(task, text) >= threshold``.

    ``generate_fn`` gets the user-message contents (:func:`render_task_prompt`) and returns n
    completions per prompt. pass@1 is the mean over tasks of c/n (with n=1 and greedy decoding: plain
    accuracy); pass@k uses :func:`pass_at_k`. ``ci95`` is the Wilson interval of pass@1 over tasks
    (with n > 1 the success count is fractional, an approximation). ``by_difficulty``: pass@1 per level.
    """
    n = k if n is None else n
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got n={n}")
    if not tasks:
        raise ValueError("no tasks to evaluate")
    reward_fn = load_reward(reward) if isinstance(reward, str) else reward
    prompts = [render_task_prompt(t, reasoning)[0]["content"] for t in tasks]
    completions = generate_fn(prompts, n, seed)
    if len(completions) != len(tasks) or any(len(c) != n for c in completions):
        raise ValueError(f"generate_fn must return {n} completions for each of {len(tasks)} prompts")
    correct = [sum(reward_fn(t, text) >= threshold for text in texts) for t, texts in zip(tasks, completions)]
    p1 = [c / n for c in correct]
    by_level = defaultdict(list)
    for t, p in zip(tasks, p1):
        by_level[t.difficulty].append(p)
    result = {
        "n_tasks": len(tasks), "n": n, "k": k,
        "pass@1": sum(p1) / len(tasks),
        "ci95": list(wilson_interval(sum(p1), len(tasks))),
        "by_difficulty": {d: sum(v) / len(v) for d, v in sorted(by_level.items())},
        "per_task": p1,  # pass@1 of each task, in order (for paired comparisons: paired_gain)
        "example": {"prompt": prompts[0], "completion": completions[0][0], "answer": tasks[0].answer},
    }
    if k > 1:
        result[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(tasks)
    return result

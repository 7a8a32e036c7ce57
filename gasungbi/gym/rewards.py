"""Rule-based rewards for reinforcement learning on the reasoning gym.

DeepSeek-R1 (arXiv:2501.12948, Sec. 2.2.2) trains R1-Zero with two rewards computed by rules, no
reward model: an *accuracy* reward (is the final answer right, checked by a program) and a *format*
reward (is the reasoning inside ``<think>...</think>`` and the answer inside ``<answer>...</answer>``).
A reward is any ``RewardFn``: ``(task, completion_text) -> float``; :func:`load_reward` turns a
name or ``module.path:function`` into one, so users can plug in their own.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from gasungbi.gym.tasks import Task, get_family

RewardFn = Callable[[Task, str], float]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAG = re.compile(r"</?(?:think|answer)>")
ACCURACY_WEIGHT, FORMAT_WEIGHT = 0.9, 0.1  # combined_reward; they sum to 1


def extract_answer(text: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>``, or None if there is none."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def format_reward(text: str) -> float:
    """1.0 iff the completion is exactly ``<think>...</think><answer>...</answer>`` (whitespace
    allowed between and around, nothing else, no nested or repeated tags, a non-empty answer)."""
    m = _FORMAT.fullmatch(text)
    ok = m is not None and not _TAG.search(m[1]) and not _TAG.search(m[2]) and m[2].strip() != ""
    return 1.0 if ok else 0.0


def accuracy_reward(task: Task, text: str, require_tags: bool = False) -> float:
    """1.0 iff the completion's answer is correct by the task family's ``check``.

    The answer is the last ``<answer>`` block. Without one, ``require_tags=True`` gives 0; otherwise
    the answer is read from the untagged text after the last ``</think>`` (the family's
    ``fallback_answer``: the last number for numeric families, else the last line), so the same
    reward scores models asked to answer directly. An unclosed ``<think>`` (a truncated trace) gets 0.
    """
    answer = extract_answer(text)
    if answer is None:
        if require_tags or ("<think>" in text and "</think>" not in text):
            return 0.0
        answer = get_family(task.family).fallback_answer(text.rsplit("</think>", 1)[-1])
    return 1.0 if get_family(task.family).check(task, answer) else 0.0


def combined_reward(task: Task, text: str) -> float:
    """``0.9 * accuracy + 0.1 * format``: 1.0 exactly when the answer is right *and* well formed.

    R1 adds its two rewards without stated weights; TinyZero gives 0.1 for a well-formed wrong
    answer and 1.0 for a right one. Ours keeps the maximum at 1 so that ``reward >= 1`` means "right
    and well formed" (distillation's filter relies on it); GRPO's group normalization is scale-free.
    """
    return ACCURACY_WEIGHT * accuracy_reward(task, text) + FORMAT_WEIGHT * format_reward(text)


BUILTIN: dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "format": lambda task, text: format_reward(text),
    "accuracy+format": combined_reward,
}


def load_reward(spec: str) -> RewardFn:
    """A reward by built-in name (``accuracy``, ``format``, ``accuracy+format``) or a user callable
    ``module.path:function`` taking ``(task, completion_text)`` and returning a float."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ValueError(f"unknown reward {spec!r}; use one of {', '.join(BUILTIN)} or module.path:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn

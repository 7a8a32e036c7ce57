"""The reasoning gym: generators of tasks whose answers a program can check, at graded difficulty.

Families (``FAMILIES``; ``difficulty`` means):

- ``arithmetic``: ``a op b`` with op in + - * and two ``difficulty``-digit operands.
- ``countdown``: reach a target from ``difficulty`` numbers with + - * / and parentheses
  (the TinyZero task, github.com/Jiayi-Pan/TinyZero, after the TV game). Rule: each given number is
  used **exactly once**, as TinyZero's verifier demands; values are exact fractions, so
  intermediate fractions are allowed (TinyZero evaluates in floats with a 1e-5 tolerance). Numbers
  are 1-50 and targets at most 999 (TinyZero: 1-99 and at most 100; smaller numbers let * and /
  appear more often). Instances are solvable by construction: the generator combines the numbers
  in a random order with random operations, keeping every intermediate a positive integer as the TV
  game does, and the result is the target; that expression is ``task.answer``.
- ``sort``: sort ``difficulty`` integers from 0 to 99 ascending.

Splits (:func:`make_split`): a task belongs to the test split iff
``sha256(family | key)`` mod 100 < ``TEST_PERCENT``, where ``key`` is the task's content up to
symmetries that do not change the problem (operand order of + and *, the order of the countdown
numbers, the order of the list to sort). Membership depends on the content only, never on the
seed, so no test task is ever a train task, whatever seeds either side used. The seed picks which
tasks are drawn: generation runs until ``n`` tasks of the requested split are found.

A new family subclasses :class:`TaskFamily` and is added with ``FAMILIES["name"] = MyFamily()``.
"""

from __future__ import annotations

import ast
import hashlib
import abc
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction

TEST_PERCENT = 25  # share of the task space held out for testing
"""A quarter, so that a small space still holds enough test tasks to measure a small gain: two-digit
addition has 4,095 problems up to operand order, of which 1,022 are test tasks (at 10%: 422). A
paired 95% interval on 1,000 tasks is about 0.63x as wide as on 400."""
REASONING_INSTRUCTION = ("Think it through inside <think> </think>, then give only the final answer inside "
                         "<answer> </answer>.")


@dataclass(frozen=True)
class Task:
    """One task: the user message (``prompt``), one correct ``answer``, and what ``check`` needs."""

    prompt: str
    answer: str
    family: str
    difficulty: int
    meta: dict = field(default_factory=dict)  # e.g. countdown: numbers, target


class TaskFamily(abc.ABC):
    """A kind of task. Subclasses set ``name`` and the difficulty range, and implement
    :meth:`generate` and :meth:`check`."""

    name = ""
    min_difficulty, max_difficulty = 1, 1

    @abc.abstractmethod
    def generate(self, rng: random.Random, difficulty: int) -> Task:
        """A task of this family at ``difficulty``, drawn with ``rng``."""

    @abc.abstractmethod
    def check(self, task: Task, answer_text: str) -> bool:
        """Is ``answer_text`` (the answer alone, tags removed) a correct answer to ``task``?"""

    def key(self, task: Task) -> str:
        """The task's content for the train/test split; equal keys are the same problem."""
        return task.prompt

    def fallback_answer(self, text: str) -> str:
        """The answer in an untagged completion: its last non-empty line."""
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def validate_difficulty(self, difficulty: int) -> None:
        if not self.min_difficulty <= difficulty <= self.max_difficulty:
            raise ValueError(f"{self.name} difficulty must be in [{self.min_difficulty}, {self.max_difficulty}], "
                             f"got {difficulty}")


_INT = re.compile(r"[+-]?\d[\d,]*")


def _parse_int(text: str) -> int | None:
    """An integer answer, allowing thousands commas, a trailing period and a Unicode minus."""
    s = text.strip().replace("\u2212", "-").rstrip(".").replace(",", "").replace(" ", "")
    return int(s) if re.fullmatch(r"[+-]?\d+", s) else None


class Arithmetic(TaskFamily):
    """``What is 37 + 85?`` -> ``122``. Difficulty: digits per operand."""

    name = "arithmetic"
    min_difficulty, max_difficulty = 1, 18

    def generate(self, rng: random.Random, difficulty: int) -> Task:
        self.validate_difficulty(difficulty)
        lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
        a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-*")
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Task(f"What is {a} {op} {b}? Answer with the number.", str(value), self.name, difficulty,
                    {"a": a, "b": b, "op": op})

    def check(self, task: Task, answer_text: str) -> bool:
        return _parse_int(answer_text) == int(task.answer)

    def key(self, task: Task) -> str:
        a, b, op = task.meta["a"], task.meta["b"], task.meta["op"]
        return f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"

    def fallback_answer(self, text: str) -> str:
        found = _INT.findall(text.replace("\u2212", "-"))
        return found[-1] if found else ""


class Addition(Arithmetic):
    """``What is 37 + 85?`` only: the gentlest family, for CPU-sized RL demonstrations."""

    name = "addition"

    def generate(self, rng: random.Random, difficulty: int) -> Task:
        self.validate_difficulty(difficulty)
        lo, hi = (0 if difficulty == 1 else 10 ** (difficulty - 1)), 10**difficulty - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return Task(f"What is {a} + {b}? Answer with the number.", str(a + b), self.name, difficulty,
                    {"a": a, "b": b, "op": "+"})


class _BadExpression(Exception):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression made only of non-negative integers, + - * / and parentheses."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult, ast.Div):
        a, b = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise _BadExpression("division by zero")
        return a / b
    raise _BadExpression(f"not allowed: {type(node).__name__}")  # names, calls, **, unary minus, floats...


class Countdown(TaskFamily):
    """Reach a target from the given numbers, each used exactly once. Difficulty: how many numbers."""

    name = "countdown"
    min_difficulty, max_difficulty = 2, 6
    max_number, max_target, max_expression_chars = 50, 999, 200

    def generate(self, rng: random.Random, difficulty: int) -> Task:
        self.validate_difficulty(difficulty)
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(difficulty)]
            items = [(n, str(n)) for n in numbers]  # (value, expression)
            while len(items) > 1:
                (a, ea), (b, eb) = sorted((items.pop(rng.randrange(len(items))) for _ in range(2)), reverse=True)
                ops = ["+"] + ["-"] * (a > b) + ["*"] * (a * b <= self.max_target) + ["/"] * (b > 1 and a % b == 0)
                op = rng.choice(ops)
                value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
                items.append((value, f"({ea} {op} {eb})"))
            target, expression = items[0][0], items[0][1][1:-1]
            if target <= self.max_target and target not in numbers:
                break
        shown = ", ".join(map(str, numbers))
        prompt = (f"Using the numbers {shown}, make {target}. Use each number exactly once, with + - * / and "
                  f"parentheses. Answer with the expression.")
        return Task(prompt, expression, self.name, difficulty, {"numbers": numbers, "target": target})

    def check(self, task: Task, answer_text: str) -> bool:
        """Parsed with ``ast`` (never ``eval``): integers, + - * /, parentheses; x and \u00d7 mean *,
        \u00f7 means /; an ``= target`` on either side is allowed."""
        s = answer_text.strip().replace("\u00d7", "*").replace("\u00f7", "/").replace("x", "*").replace("X", "*")
        if len(s) > self.max_expression_chars:
            return False
        sides = [p.strip() for p in s.split("=")]
        if len(sides) > 2 or (len(sides) == 2 and str(task.meta["target"]) not in sides):
            return False  # "expr = target" and "target = expr" are fine
        expr = sides[0] if len(sides) == 1 or sides[1] == str(task.meta["target"]) else sides[1]
        used: list[int] = []
        try:
            value = _evaluate(ast.parse(expr, mode="eval"), used)
        except (SyntaxError, ValueError, RecursionError, MemoryError, _BadExpression):
            return False
        return value == task.meta["target"] and sorted(used) == sorted(task.meta["numbers"])

    def key(self, task: Task) -> str:
        return f"{sorted(task.meta['numbers'])}->{task.meta['target']}"


class Sort(TaskFamily):
    """Sort integers ascending: ``42, 7, 19`` -> ``7, 19, 42``. Difficulty: how many integers."""

    name = "sort"
    min_difficulty, max_difficulty = 2, 30

    def generate(self, rng: random.Random, difficulty: int) -> Task:
        self.validate_difficulty(difficulty)
        numbers = [rng.randint(0, 99) for _ in range(difficulty)]
        prompt = (f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}. "
                  f"Answer with the numbers separated by commas.")
        return Task(prompt, ", ".join(map(str, sorted(numbers))), self.name, difficulty, {"numbers": numbers})

    def check(self, task: Task, answer_text: str) -> bool:
        if re.sub(r"-?\d+|[\s,;\[\]().]", "", answer_text):
            return False  # anything but numbers and separators
        return [int(x) for x in re.findall(r"-?\d+", answer_text)] == sorted(task.meta["numbers"])

    def key(self, task: Task) -> str:
        return str(sorted(task.meta["numbers"]))


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Arithmetic(), Addition(), Countdown(), Sort())}


def get_family(name: str) -> TaskFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def task_split(family: TaskFamily, task: Task) -> str:
    """``"test"`` or ``"train"``, from the task's content alone (see the module docstring)."""
    digest = hashlib.sha256(f"{family.name}|{family.key(task)}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def make_split(family: str | TaskFamily, n: int, difficulty: int, seed: int = 0, split: str = "train",
               unique: bool = True, max_misses: int = 10_000) -> list[Task]:
    """``n`` tasks of one split, the same for the same arguments. ``unique``: no two tasks share a key;
    raises when ``max_misses`` draws in a row find nothing new (the space at this difficulty is too small)."""
    fam = get_family(family) if isinstance(family, str) else family
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; choose train or test")
    fam.validate_difficulty(difficulty)
    rng = random.Random(f"{fam.name}:{difficulty}:{seed}:{split}")
    tasks, seen, misses = [], set(), 0
    while len(tasks) < n:
        task = fam.generate(rng, difficulty)
        key = fam.key(task)
        if task_split(fam, task) == split and not (unique and key in seen):
            tasks.append(task)
            seen.add(key)
            misses = 0
        else:
            misses += 1
            if misses > max_misses:
                raise ValueError(f"found only {len(tasks)} distinct {split} tasks of {fam.name} at difficulty "
                                 f"{difficulty}; ask for fewer, raise the difficulty, or pass unique=False")
    return tasks


def render_task_prompt(task: Task, reasoning: bool = True) -> list[dict[str, str]]:
    """The chat messages (one user turn, no system prompt) that pose ``task``. ``reasoning`` adds the
    R1-Zero instruction (DeepSeek-R1, arXiv:2501.12948, Table 1) to answer as
    ``<think>...</think><answer>...</answer>``."""
    content = f"{task.prompt} {REASONING_INSTRUCTION}" if reasoning else task.prompt
    return [{"role": "user", "content": content}]

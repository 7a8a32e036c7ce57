"""The reasoning gym: task generators, splits, checkers, rewards, and pass@k."""

import sys

import pytest

from gasungbi.eval.tasks import evaluate_tasks, pass_at_k, wilson_interval
from gasungbi.gym.rewards import accuracy_reward, combined_reward, extract_answer, format_reward, load_reward
from gasungbi.gym.tasks import FAMILIES, Task, get_family, make_split, render_task_prompt, task_split


def _countdown(numbers, target):
    return Task("", "", "countdown", len(numbers), {"numbers": numbers, "target": target})


ADD = Task("What is 999 + 235? Answer with the number.", "1234", "arithmetic", 3, {"a": 999, "b": 235, "op": "+"})


@pytest.mark.parametrize("family,difficulty", [("arithmetic", 3), ("countdown", 4), ("sort", 5)])
def test_splits_deterministic_disjoint_and_self_consistent(family, difficulty):
    fam = get_family(family)
    train = make_split(family, 3000, difficulty, seed=1, split="train")
    test = make_split(family, 500, difficulty, seed=2, split="test")
    assert make_split(family, 50, difficulty, seed=1, split="train") == train[:50]
    assert make_split(family, 50, difficulty, seed=3, split="train") != train[:50]
    train_keys, test_keys = {fam.key(t) for t in train}, {fam.key(t) for t in test}
    assert len(train_keys) == 3000 and len(test_keys) == 500  # unique within a split
    assert not train_keys & test_keys and not {t.prompt for t in train} & {t.prompt for t in test}
    assert all(task_split(fam, t) == "test" for t in test)
    assert all(fam.check(t, t.answer) for t in train + test)  # the generator's own answer is right


def test_small_space_raises_clearly():
    with pytest.raises(ValueError, match="distinct test tasks"):
        make_split("arithmetic", 100, 1, split="test")
    assert len(make_split("arithmetic", 100, 1, split="test", unique=False)) == 100


def test_difficulty_grading():
    for d in (1, 3, 6):
        for t in make_split("arithmetic", 50, d, seed=0):
            assert max(len(str(t.meta["a"])), len(str(t.meta["b"]))) == d
    for d in (3, 5):
        assert all(len(t.meta["numbers"]) == d for t in make_split("countdown", 50, d, seed=0))
    assert all(len(t.meta["numbers"]) == 7 for t in make_split("sort", 20, 7, seed=0))
    with pytest.raises(ValueError, match="difficulty"):
        make_split("countdown", 1, 9)


def test_registry_and_prompt():
    with pytest.raises(ValueError, match="arithmetic, countdown, sort"):
        get_family("chess")
    task = make_split("arithmetic", 1, 2, seed=0)[0]
    assert task.prompt.endswith("Answer with the number.")
    [msg] = render_task_prompt(task, reasoning=True)
    assert msg["role"] == "user" and "<think>" in msg["content"] and msg["content"].startswith(task.prompt)
    assert render_task_prompt(task, reasoning=False) == [{"role": "user", "content": task.prompt}]


def test_arithmetic_check():
    fam = FAMILIES["arithmetic"]
    for good in ("1234", " 1234 ", "1,234", "1234."):
        assert fam.check(ADD, good), good
    for bad in ("1235", "", "about 1234", "1234.5", "12 34x"):
        assert not fam.check(ADD, bad), bad
    neg = Task("What is 3 - 10?", "-7", "arithmetic", 1, {"a": 3, "b": 10, "op": "-"})
    assert fam.check(neg, "-7") and fam.check(neg, "\u22127") and not fam.check(neg, "7")


def test_countdown_check():
    fam = FAMILIES["countdown"]
    task = _countdown([3, 5, 7], 22)
    for good in ("3 * 5 + 7", "7 + 3*5", "((3 * 5) + 7)", "3 x 5 + 7", "3 \u00d7 5 + 7", "3 * 5 + 7 = 22",
                 "22 = 7 + 5 * 3"):
        assert fam.check(task, good), good
    assert fam.check(_countdown([1, 3, 4, 6], 24), "6 / (1 - 3 / 4)")  # exact fractions in between
    for bad in ("3 * 5 + 8",                 # a number not given
                "3 * 5 + 7 + 7 - 7",         # a number used more than once
                "3 * 5",                     # not every number used (the exactly-once rule)
                "3 * 5 + 7 = 23", "7 + 5 + 3",  # wrong value
                "3 ** 5 + 7", "-3 * 5 + 7 + 37", "3.0 * 5 + 7", "abs(3) * 5 + 7", "x3 * 5 + 7",
                "__import__('os').system('true')", "[3, 5, 7]", "3 * 5 + 7; 1", "",
                "(" * 300 + "3" + ")" * 300 + " * 5 + 7"):
        assert not fam.check(task, bad), bad
    assert not fam.check(_countdown([3, 5, 5], 22), "3 / (5 - 5) + 5")  # division by zero


def test_sort_check():
    fam = FAMILIES["sort"]
    task = Task("", "2, 7, 7, 40", "sort", 4, {"numbers": [7, 40, 2, 7]})
    assert fam.check(task, "2, 7, 7, 40") and fam.check(task, "[2, 7, 7, 40]")
    assert not fam.check(task, "2, 7, 40") and not fam.check(task, "40, 7, 7, 2") and not fam.check(task, "2 7 7 40 ok")


def test_extract_answer_and_format_reward():
    assert extract_answer("no tags") is None
    assert extract_answer("<answer> 12 </answer>") == "12"
    assert extract_answer("<answer>1</answer> then <answer>\n2\n</answer>") == "2"
    assert format_reward("<think>7+5</think><answer>12</answer>") == 1.0
    assert format_reward("  <think>\na\nb\n</think>\n<answer> 12 </answer>\n") == 1.0
    for bad in ("<answer>12</answer>", "<think>x</think>", "hi <think>x</think><answer>12</answer>",
                "<think>x</think><answer>12</answer> bye", "<think>x</think><answer>1</answer><answer>2</answer>",
                "<think><think>x</think><answer>12</answer>", "<think>x</think><answer> </answer>",
                "<answer>12</answer><think>x</think>", "12"):
        assert format_reward(bad) == 0.0, bad


def test_accuracy_and_combined_reward():
    assert accuracy_reward(ADD, "<think>999+235</think><answer>1234</answer>") == 1.0
    assert accuracy_reward(ADD, "<think>x</think><answer>1233</answer>") == 0.0
    assert accuracy_reward(ADD, "<answer>1</answer><answer>1234</answer>") == 1.0  # the last answer counts
    assert accuracy_reward(ADD, "999 + 235 = 1234") == 1.0  # untagged: the last number
    assert accuracy_reward(ADD, "1234", require_tags=True) == 0.0
    assert accuracy_reward(ADD, "<think>it is 1234") == 0.0  # truncated trace
    assert accuracy_reward(ADD, "<think>1234?</think> 1000") == 0.0  # only what follows </think>
    assert combined_reward(ADD, "<think>x</think><answer>1234</answer>") == pytest.approx(1.0)
    assert combined_reward(ADD, "<think>x</think><answer>1</answer>") == pytest.approx(0.1)
    assert combined_reward(ADD, "1234") == pytest.approx(0.9)


def test_load_reward_builtins_and_user_callable(tmp_path, monkeypatch):
    assert load_reward("accuracy") is accuracy_reward
    assert load_reward("format")(ADD, "<think></think><answer>1</answer>") == 1.0
    (tmp_path / "my_gym_rewards.py").write_text("def short(task, text):\n    return 1.0 / (1 + len(text))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("my_gym_rewards:short")(ADD, "abc") == 0.25
    with pytest.raises(ValueError, match="no callable 'missing'"):
        load_reward("my_gym_rewards:missing")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="accuracy, format, accuracy\\+format"):
        load_reward("speed")
    sys.modules.pop("my_gym_rewards", None)


def test_pass_at_k_and_wilson():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw of k contains a correct one
    assert pass_at_k(200, 10, 100) == pytest.approx(1 - 0.5**10, abs=2e-3)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_evaluate_tasks_with_a_fake_model():
    tasks = make_split("arithmetic", 6, 1, seed=0, split="test") + make_split("arithmetic", 4, 2, seed=0, split="test")
    by_prompt = {render_task_prompt(t, True)[0]["content"]: t for t in tasks}
    calls = []

    def generate_fn(prompts, n, seed):  # right on the first sample only, for level-1 tasks only
        calls.append((len(prompts), n, seed))
        right = [by_prompt[p].difficulty == 1 for p in prompts]
        return [[f"<answer>{by_prompt[p].answer if ok and i == 0 else 'x'}</answer>" for i in range(n)]
                for p, ok in zip(prompts, right)]

    r = evaluate_tasks(generate_fn, tasks, k=2, n=4, seed=7)
    assert calls == [(10, 4, 7)]
    assert r["n_tasks"] == 10 and r["pass@1"] == pytest.approx(6 / 10 / 4)
    assert r["pass@2"] == pytest.approx(6 / 10 * pass_at_k(4, 1, 2))
    assert r["by_difficulty"] == {1: pytest.approx(0.25), 2: 0.0}
    assert r["ci95"][0] < r["pass@1"] < r["ci95"][1]
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluate_tasks(generate_fn, tasks, k=2, n=1)
    assert r["per_task"] == [0.25] * 6 + [0.0] * 4  # in task order, for paired comparisons


def test_paired_gain_interval_and_mcnemar():
    import random
    from gasungbi.eval.tasks import paired_gain
    rng = random.Random(0)
    before = [rng.random() < 0.4 for _ in range(300)]
    after = [(x and rng.random() < 0.9) or (not x and rng.random() < 0.3) for x in before]
    g = paired_gain(before, after)
    assert g["gain"] == pytest.approx((sum(after) - sum(before)) / 300)
    assert g["gained"] == sum(1 for x, y in zip(before, after) if y and not x)
    # an independent check: the paired bootstrap's 95% percentile interval (resampling tasks, pairs kept)
    diffs = [int(y) - int(x) for x, y in zip(before, after)]
    boots = sorted(sum(diffs[rng.randrange(300)] for _ in range(300)) / 300 for _ in range(2000))
    assert g["ci95"][0] == pytest.approx(boots[50], abs=0.01) and g["ci95"][1] == pytest.approx(boots[1949], abs=0.01)
    # pairing narrows the interval: the same marginals, perfectly correlated outcomes
    same = paired_gain(before, before)
    assert same["gain"] == 0 and same["mcnemar_p"] == 1.0 and same["ci95"][1] - same["ci95"][0] < 0.02
    # McNemar's exact test: 10 gained, none lost -> 2 x 0.5^10
    assert paired_gain([0] * 20, [1] * 10 + [0] * 10)["mcnemar_p"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        paired_gain([1, 0], [1])


def test_cold_start_addition_trace_works_the_columns():
    """The cold-start thought for ``a + b`` is the column working, units first, and it is right:
    replaying its steps (each digit pair plus the stated carry) rebuilds the answer it ends with."""
    from gasungbi.gym.cold_start import column_sums, worked_answer

    assert column_sums(37, 85) == "7+5=12, 3+8+1=12"
    assert column_sums(5, 123) == "5+3=8, 0+2=2, 0+1=1"
    assert column_sums(0, 0) == "0+0=0"
    for t in make_split("addition", 200, 2, seed=1) + make_split("arithmetic", 100, 3, seed=1):
        text = worked_answer(t)
        thought, answer = text[len("<think>"):text.index("</think>")], text[text.index("<answer>") + 8:-len("</answer>")]
        assert answer == t.answer
        if t.meta["op"] != "+":
            assert thought == f"{t.meta['a']} {t.meta['op']} {t.meta['b']}"
            continue
        digits, carry = [], 0
        for step in thought.split(", "):
            lhs, total = step.split("=")
            terms = [int(x) for x in lhs.split("+")]
            assert sum(terms) == int(total) and terms[2:] == ([carry] if carry else [])
            digits.append(int(total) % 10)
            carry = int(total) // 10
        assert carry * 10 ** len(digits) + int("".join(map(str, reversed(digits)))) == int(t.answer)

"""Tests for shared/tasks.py: determinism, disjoint splits, correct gold answers, solvable
Countdown problems, level contents, size limits, and the Hub adapters (offline failure and the
row-to-Problem mapping, on hand-made rows)."""

import ast
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shared import tasks as T
from shared.tasks import (
    ARITH_PROMPT,
    COUNTDOWN_PROMPT,
    Problem,
    Task,
    load_task,
)
from shared.verifiers import countdown_numbers_used, safe_arith, verify_countdown

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=300, n_test=100)  # enough to see every op, fast to build


def keys(problems):
    return [p.prompt for p in problems]


def canonical(expression: str) -> str:
    """Independent canonical form: parse with ast, sort the operands of + and *."""

    def walk(node):
        if isinstance(node, ast.Constant):
            return str(node.value)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        a, b = walk(node.left), walk(node.right)
        if op in "+*":
            a, b = sorted((a, b))
        return f"({a}{op}{b})"

    return walk(ast.parse(expression, mode="eval").body)


def problem_key(task: Task, p: Problem) -> str:
    if task.name == "countdown":
        return f"{sorted(p.meta['numbers'])}->{p.meta['target']}"
    return canonical(p.meta["expression"])


BUILTIN = [("arith", level) for level in range(1, 6)] + [("countdown", 1), ("countdown", 2)]


@pytest.fixture(scope="module")
def built():
    """Each built-in task at each level, built once for the module."""
    return {(name, level): load_task(name, seed=0, level=level, **SMALL) for name, level in BUILTIN}


# --------------------------------------------------------------------------- seeds and splits


@pytest.mark.parametrize("name, level", BUILTIN)
def test_same_seed_same_task(name, level, built):
    again = load_task(name, seed=0, level=level, **SMALL)
    assert again == built[name, level]


@pytest.mark.parametrize("name, level", BUILTIN)
def test_seed_changes_train_not_test(name, level, built):
    task, other = built[name, level], load_task(name, seed=1, level=level, **SMALL)
    assert keys(task.train) != keys(other.train)
    assert set(keys(task.train)) != set(keys(other.train))
    assert other.test == task.test  # the held-out set does not depend on the seed...
    bigger = load_task(name, seed=0, level=level, n_train=50, n_test=150)
    assert bigger.test[:100] == task.test  # ...nor on n_train; a smaller n_test is a prefix


@pytest.mark.parametrize("name, level", BUILTIN)
def test_splits_are_disjoint_and_distinct(name, level, built):
    task = built[name, level]
    assert len(task.train) == SMALL["n_train"] and len(task.test) == SMALL["n_test"]
    train_keys = {problem_key(task, p) for p in task.train}
    test_keys = {problem_key(task, p) for p in task.test}
    assert not train_keys & test_keys  # disjoint up to commutativity, not just by text
    assert not set(keys(task.train)) & set(keys(task.test))
    assert len(set(keys(task.train))) == len(task.train)  # no duplicates within a split
    assert len(set(keys(task.test))) == len(task.test)


def test_test_split_is_held_out_across_arith_levels():
    level1_test = {canonical(p.meta["expression"]) for p in load_task("arith", level=1).test}
    level2_train = {canonical(p.meta["expression"]) for p in load_task("arith", level=2).train}
    assert not level1_test & level2_train


PINNED_COUNTDOWN = ([46, 80, 37], 89)  # numbers, target of countdown level 1's first test problem


def test_test_split_is_pinned():
    """Changing the hash, the generator or the prompt changes every reported eval number; this
    test makes such a change deliberate."""
    assert load_task("arith", n_train=0, n_test=1).test[0].prompt == \
        "What is 31 + 94? Give only the final number."
    first = load_task("countdown", n_train=0, n_test=1).test[0]
    assert (first.meta["numbers"], first.meta["target"]) == PINNED_COUNTDOWN


# ----------------------------------------------------------------------- gold answers and levels


@pytest.mark.parametrize("level", range(1, 6))
def test_arith_gold_answers(level, built):
    task = built["arith", level]
    for p in task.train + task.test:
        value = safe_arith(p.meta["expression"])
        assert value.denominator == 1 and str(value.numerator) == p.answer
        assert p.prompt == ARITH_PROMPT.format(expression=p.meta["expression"])
        assert task.reward(f"The answer is {p.answer}.", p) == 1.0
        assert task.reward(f"The answer is {int(p.answer) + 1}.", p) == 0.0
        assert task.verify("I don't know", p).format_ok is False


def operands(p):
    return [int(tok) for tok in p.meta["expression"].replace("(", " ").replace(")", " ").split()
            if tok.isdigit()]


def test_arith_levels_use_the_intended_operations(built):
    level = {k: built["arith", k].train + built["arith", k].test for k in range(1, 6)}
    for p in level[1]:
        assert p.meta["ops"] == ["+"] and all(10 <= x <= 99 for x in operands(p))
    assert {op for p in level[2] for op in p.meta["ops"]} == {"+", "-"}
    for p in level[2]:
        assert len(p.meta["ops"]) == 1 and int(p.answer) >= 0
        assert all(10 <= x <= 99 for x in operands(p))
    assert {op for p in level[3] for op in p.meta["ops"]} == {"+", "-", "*"}
    for p in level[3]:
        (op,), (a, b) = p.meta["ops"], operands(p)
        if op == "*":
            assert sorted([len(str(a)), len(str(b))]) == [1, 2] and min(a, b) >= 2
        else:
            assert 100 <= a <= 999 and 100 <= b <= 999 and int(p.answer) >= 0
    for k, n_ops in [(4, 2), (5, 3)]:
        for p in level[k]:
            assert len(p.meta["ops"]) == n_ops and len(set(p.meta["ops"])) >= 2
            assert "(" in p.meta["expression"]
            assert all(2 <= x <= 20 for x in operands(p))
    assert "/" in {op for p in level[5] for op in p.meta["ops"]}  # exact divisions do occur


@pytest.mark.parametrize("level", [1, 2])
def test_countdown_is_always_solvable(level, built):
    task = built["countdown", level]
    assert task.mode == "countdown"
    for p in task.train + task.test:
        numbers, target, solution = p.meta["numbers"], p.meta["target"], p.meta["solution"]
        assert len(numbers) == level + 2 and all(1 <= n <= 99 for n in numbers)
        assert 1 <= target <= 100 and p.answer == str(target)
        assert Counter(countdown_numbers_used(solution)) == Counter(numbers)
        assert safe_arith(solution) == target
        assert verify_countdown(f"Answer: {solution}", numbers, target).correct
        assert task.reward(f"Let me try.\n<answer>{solution} = {target}</answer>", p) == 1.0
        assert task.reward(f"Answer: {' + '.join(map(str, numbers))} + 1", p) == 0.0
        assert p.prompt == COUNTDOWN_PROMPT.format(numbers=numbers, target=target)


# ------------------------------------------------------------------------------ bad requests


def test_too_many_problems_raises_with_the_count():
    with pytest.raises(ValueError, match=r"arith level 1 has only \d+ distinct train problems"):
        load_task("arith", n_train=8000, n_test=0)
    with pytest.raises(ValueError, match=r"only \d+ distinct test problems"):
        load_task("arith", n_train=0, n_test=2000)
    with pytest.raises(ValueError, match="level"):
        load_task("arith", level=6)
    with pytest.raises(ValueError, match="level"):
        load_task("countdown", level=3)
    with pytest.raises(ValueError, match="non-negative"):
        load_task("arith", n_train=-1)


def test_unknown_task_exits_with_one_line_listing_valid_names():
    with pytest.raises(SystemExit) as exc:
        load_task("gsm9k")
    message = str(exc.value)
    assert "\n" not in message and "gsm9k" in message
    assert all(name in message for name in T.TASKS)


# ------------------------------------------------------------------------------- Hub adapters


def test_unreachable_hub_exits_fast_with_one_line(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(T, "_hub_reachable", lambda timeout_s=3.0: False)
    for name in ("gsm8k", "math500", "countdown-hf"):
        with pytest.raises(SystemExit) as exc:
            load_task(name)
        message = str(exc.value)
        assert "\n" not in message and message.startswith(name)
        assert "unreachable" in message and "--task arith" in message


def test_offline_hub_exits_with_one_line_from_the_command_line(tmp_path):
    """The real path through `datasets` with HF_HUB_OFFLINE=1 and an empty cache, in a fresh
    interpreter (datasets reads the flag at import). It must fail in seconds, not retry."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO)}
    code = ("import sys\nfrom shared.tasks import load_task\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n        load_task(name)\n"
            "    except SystemExit as e:\n        print(e)\n"
            "load_task('gsm8k')\n")
    result = subprocess.run([sys.executable, "-c", code, "math500", "countdown-hf"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("math500") and lines[1].startswith("countdown-hf")
    stderr = result.stderr.strip()
    assert stderr.startswith("gsm8k") and "\n" not in stderr  # the exit message, one line
    for line in lines + [stderr]:
        assert "unreachable" in line and "--task arith" in line


class FakeSplit(list):
    """Stands in for a datasets.Dataset: len() and integer indexing returning a row dict."""


def fake_hub(monkeypatch, data):
    monkeypatch.setattr(T, "_load_hub_dataset", lambda task, path, config=None: data[path])


def test_gsm8k_adapter(monkeypatch):
    rows = [{"question": f"Q{i}?", "answer": f"work\n#### {i},000"} for i in range(30)]
    splits = {"train": FakeSplit(rows[:20]), "test": FakeSplit(rows[20:])}
    fake_hub(monkeypatch, {"openai/gsm8k": splits})
    task = load_task("gsm8k", seed=0, n_train=5, n_test=3)
    assert task.mode == "answer_or_last_number" and len(task.train) == 5 and len(task.test) == 3
    assert [p.answer for p in task.test] == ["20000", "21000", "22000"]  # commas dropped
    assert task.test[0].prompt.startswith("Q20?\n")
    assert task.reward("so the total is 20,000 dollars.\nAnswer: 20000", task.test[0]) == 1.0
    assert keys(load_task("gsm8k", seed=0, n_train=5).train) == keys(task.train)
    assert keys(load_task("gsm8k", seed=1, n_train=5).train) != keys(task.train)
    assert len(load_task("gsm8k", n_train=10**6, n_test=10**6).train) == 20  # capped, not an error


def test_math500_adapter_keeps_train_and_test_apart(monkeypatch):
    rows = [{"problem": f"P{i}", "answer": f"\\frac{{{i}}}{{2}}", "level": 3, "subject": "Algebra",
             "unique_id": f"id{i}"} for i in range(10)]
    fake_hub(monkeypatch, {"HuggingFaceH4/MATH-500": {"test": FakeSplit(rows)}})
    task = load_task("math500", n_train=100, n_test=4)
    assert task.mode == "boxed" and len(task.test) == 4 and len(task.train) == 6
    assert not set(keys(task.train)) & set(keys(task.test))
    assert task.test[1].meta["unique_id"] == "id1"
    assert task.reward("... so \\boxed{0.5}", task.test[1]) == 1.0
    assert task.reward("... so 0.5", task.test[1]) == 0.0  # not boxed


def test_countdown_hf_adapter(monkeypatch):
    rows = [{"nums": [i, 2, 3], "target": i + 5} for i in range(1, 200)]
    fake_hub(monkeypatch, {"Jiayi-Pan/Countdown-Tasks-3to4": {"train": FakeSplit(rows)}})
    task = load_task("countdown-hf", n_train=50, n_test=5)
    assert task.mode == "countdown" and len(task.train) == 50 and len(task.test) == 5
    assert not set(keys(task.train)) & set(keys(task.test))
    p = task.test[0]
    a = p.meta["numbers"][0]
    assert task.reward(f"Answer: {a} + 2 + 3", p) == 1.0
    assert task.reward(f"Answer: {a} + 5", p) == 0.0


# ---------------------------------------------------------------- the dev split
@pytest.mark.parametrize("name, level", BUILTIN + [("multistep", 1), ("multistep", 4)])
def test_dev_split_is_disjoint_from_train_and_test_and_does_not_move_with_the_seed(name, level):
    a = load_task(name, seed=0, level=level, n_train=300, n_test=100, n_dev=80)
    b = load_task(name, seed=1, level=level, n_train=300, n_test=100, n_dev=80)
    assert len(a.dev) == 80 and a.dev == b.dev and a.test == b.test
    dev = {problem_key(a, p) for p in a.dev}
    assert len({p.prompt for p in a.dev}) == 80  # distinct problems (a + b and b + a share a key)
    assert not dev & {problem_key(a, p) for p in a.train + b.train + a.test}
    assert load_task(name, seed=0, level=level, n_train=1, n_test=1, n_dev=20).dev == a.dev[:20]  # a prefix
    assert load_task(name, seed=0, level=level, n_train=300, n_test=100).dev == []  # none unless asked


def test_hf_adapters_hold_out_a_dev_split(monkeypatch):
    rows = [{"question": f"Q{i}?", "answer": f"work\n#### {i}"} for i in range(30)]
    fake_hub(monkeypatch, {"openai/gsm8k": {"train": FakeSplit(rows[:20]), "test": FakeSplit(rows[20:])},
                           "HuggingFaceH4/MATH-500": {"test": FakeSplit(
                               [{"problem": f"P{i}", "answer": str(i)} for i in range(10)])},
                           "Jiayi-Pan/Countdown-Tasks-3to4": {"train": FakeSplit(
                               [{"nums": [i, 2, 3], "target": i + 5} for i in range(1, 400)])}})
    for name, sizes in (("gsm8k", dict(n_train=100, n_test=3, n_dev=4)), ("math500", dict(n_train=100, n_test=4, n_dev=3)),
                        ("countdown-hf", dict(n_train=50, n_test=5, n_dev=5))):
        a, b = load_task(name, seed=0, **sizes), load_task(name, seed=1, **sizes)
        assert len(a.dev) == sizes["n_dev"] and keys(a.dev) == keys(b.dev), name
        assert not set(keys(a.dev)) & set(keys(a.train + b.train + a.test)), name
    assert len(load_task("gsm8k", n_train=100, n_test=3, n_dev=4).train) == 16  # 20 train rows minus dev

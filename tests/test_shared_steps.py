"""shared/steps.py and the `multistep` task: exact step checking of model text, with attacks and bounds."""

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shared.verifiers as V
from shared.steps import MAX_STEPS, check_steps, split_steps
from shared.tasks import MULTISTEP_LEVELS, load_task, solution_steps


def test_a_correct_multi_step_solution_passes_every_step():
    text = "12 + 7 = 19\nSo 19 * 3 = 57.\n57 - 5 = 52\nAnswer: 52"
    r = check_steps(text, [12, 7, 3, 5])
    assert [s.text for s in r.steps] == ["12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52"]
    assert r.all_ok and r.first_error is None and r.steps[-1].value == 52


def test_a_planted_wrong_step_is_found_at_its_index():
    text = "12 + 7 = 19\n19 * 3 = 56\n56 - 5 = 51\nAnswer: 51"
    r = check_steps(text, [12, 7, 3, 5])
    assert r.first_error == 1 and not r.steps[1].arithmetic_ok and r.steps[1].grounded
    assert r.steps[2].ok  # a later step that computes correctly from the wrong value is itself right


def test_a_step_that_invents_a_number_is_flagged():
    r = check_steps("12 + 8 = 20\n20 * 3 = 60", [12, 7, 3])
    assert r.first_error == 0 and r.steps[0].arithmetic_ok and not r.steps[0].grounded
    # numbers computed inside a step become usable later ("14 + 15" introduces 15 = 3 * 5)
    r = check_steps("3 * 5 = 15\n14 + 15 = 29", [14, 3, 5])
    assert r.all_ok


@pytest.mark.parametrize("text, expected", [
    ("Step 1: 7 - 5 = 2\n- 2 + 8 = 10", ["7 - 5 = 2", "2 + 8 = 10"]),
    ("1. 9 + 3 = 12\n2. 12 - 4 = 8", ["9 + 3 = 12", "12 - 4 = 8"]),
    ("First, 7 - 5 = 2.\n(that is 2 + 8 = 10)", ["7 - 5 = 2", "2 + 8 = 10"]),
    ("The result is 14 + 3 * 5 = 14 + 15 = 29", ["14 + 3 * 5 = 14 + 15 = 29"]),
    ("no equations here\nAnswer: 5", []),
    ("6 × 7 = 42", ["6 × 7 = 42"]),
])
def test_split_steps(text, expected):
    assert split_steps(text) == expected


def test_chains_mixed_operators_and_malformed_steps():
    assert check_steps("14 + 3 * 5 = 14 + 15 = 29", [14, 3, 5]).all_ok
    assert check_steps("6 × 7 = 42", [6, 7]).all_ok  # × is read as *
    assert check_steps("8 / 3 = 2.6667", [8, 3]).first_error == 0  # exact: 8/3 is not 2.6667
    for bad in ("= 5", "5 =", "7 - = 2", "2 + 2 = 4 = 5"):
        assert check_steps(bad, [2, 4, 5, 7]).first_error == 0, bad
    assert not check_steps("", []).all_ok and check_steps("", []).first_error is None  # no steps at all


@pytest.mark.parametrize("attack", [
    "__import__('os').system('echo pwned') = 0",
    "(lambda: 1)() = 1",
    "9**9**9**9 = 1",
    "2 ** 1000000 = 1",
    "1" + "0" * 5000 + " = 1",
    "(" * 5000 + "1" + ")" * 5000 + " = 1",
    "1 = " * 200000,
    ("1 + 1 = 2\n" * 200000),
    "٣ + ٤ = ٧",  # Arabic-Indic digits are not numbers here
])
def test_attacks_are_wrong_steps_and_bounded(attack):
    calls = {"n": 0}
    real = V.safe_arith

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    import shared.steps as S
    S.safe_arith = counting
    try:
        r = check_steps(attack, [1, 2])
    finally:
        S.safe_arith = real
    assert len(r.steps) <= MAX_STEPS and calls["n"] <= MAX_STEPS * 8  # work is bounded, not timed
    assert not r.all_ok or attack.startswith("1 + 1 = 2")


def test_a_million_characters_return_quickly():
    t = time.perf_counter()
    check_steps("=" + "1+" * 500_000 + "x", [1])
    check_steps("7 " * 500_000 + "= 3", [7])
    assert time.perf_counter() - t < 30  # a generous backstop; the real bound is the character cap


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_never_raises_on_any_text(text):
    r = check_steps(text, [1, 2, 3])
    assert r.first_error is None or 0 <= r.first_error < len(r.steps)


# ---------------------------------------------------------------- the multistep task
@pytest.mark.parametrize("level", sorted(MULTISTEP_LEVELS))
def test_reference_solutions_pass_the_checker_and_end_at_the_answer(level):
    task = load_task("multistep", level=level, n_train=50, n_test=20)
    n_ops = MULTISTEP_LEVELS[level][0]
    for p in task.train + task.test:
        steps = p.meta["steps"]
        assert len(steps) == n_ops
        r = check_steps(p.meta["solution"], p.meta["numbers"])
        assert r.all_ok and r.steps[-1].value == Fraction(p.answer)
        assert all(v >= 0 for v in (s.value for s in r.steps))  # never below zero on the way
        assert task.verify(p.meta["solution"], p).correct
        assert p.meta["expression"] in p.prompt and "one calculation per line" in p.prompt


def test_multistep_shares_arith_keys_so_splits_agree():
    """Problems are split by arith's keys, so an expression held out of arith is held out here too."""
    from shared.tasks import _split_of
    from tests.test_shared_tasks import canonical

    assert solution_steps(("*", ("+", 12, 7), 3)) == ["12 + 7 = 19", "19 * 3 = 57"]
    for level in (1, 4):
        task = load_task("multistep", level=level, n_train=300, n_test=100)
        for split, problems in (("train", task.train), ("test", task.test)):
            assert all(_split_of("arith:" + canonical(p.meta["expression"])) == split for p in problems)

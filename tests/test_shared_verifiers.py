"""Tests for shared/verifiers.py: extraction, exact number parsing, safe arithmetic, Countdown,
named attacks, huge inputs, thread-safe deadlines, and hypothesis fuzzing.

The attack tests time each call; 1 s is a generous bound for operations that take microseconds to
milliseconds, so a failure means a real blow-up (backtracking, huge powers), not a slow CI box.
"""

import ast
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import verifiers as V
from shared.verifiers import (
    MAX_EXPR_CHARS,
    MAX_TEXT_CHARS,
    Verdict,
    countdown_numbers_used,
    extract_answer,
    parse_number,
    safe_arith,
    verify_countdown,
    verify_math,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def strict_verifiers(monkeypatch):
    """Internal errors would otherwise be scored as a wrong answer; make them fail the tests."""
    monkeypatch.setattr(V, "_RAISE_INTERNAL_ERRORS", True)


def timed(fn, *args, **kwargs):
    """(result or raised exception, seconds)."""
    start = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the caller checks which
        result = e
    return result, time.monotonic() - start


# ------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{3} no wait \boxed{4}", "4"),  # several boxes: the last wins
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\boxed{5}}", "5"),
    (r"\boxed {7}", "7"),
    (r"\boxed{1} and then \boxed{2", "1"),  # an unclosed box is not a box
    (r"\boxed{}", None),  # empty
    ("no box here 42", None),
    (r"}}} \boxed{8} }}", "8"),  # stray closing braces are ignored
])
def test_extract_boxed(text, expected):
    assert extract_answer(text, "boxed") == expected


@pytest.mark.parametrize("text, expected", [
    ("Some work.\nAnswer: 68", "68"),
    ("answer : 12\nmore\nANSWER: 13 ", "13"),  # last one, case-insensitive
    ("**Answer:** 42", "42"),  # markdown bold around it
    ("Answer:\n\n7", "7"),
    ("The answer is 5", None),
    ("Answer:", None),
])
def test_extract_answer_line(text, expected):
    assert extract_answer(text, "answer") == expected


@pytest.mark.parametrize("text, expected", [
    ("23 + 45 = 68", "68"),
    ("it is -22.", "-22"),
    ("50-23", "23"),  # a minus after a number is subtraction, not a sign
    ("(3)-2", "2"),
    ("total 1,234 apples", "1,234"),
    ("about 2.5 hours.", "2.5"),
    ("half is 1/2", "1/2"),
    ("list 1,2,3", "3"),
    ("12,3456", "3456"),  # not a thousands group
    ("no digits", None),
    ("٣ and ４５", None),  # Unicode digits are not numbers here
])
def test_extract_last_number(text, expected):
    assert extract_answer(text, "last_number") == expected


def test_extract_only_reads_the_tail():
    text = r"\boxed{1}" + " " * MAX_TEXT_CHARS + "nothing at the end"
    assert extract_answer(text, "boxed") is None
    assert extract_answer("Answer: " + "9" * (V.MAX_ANSWER_CHARS + 1), "answer") is None  # too long


def test_unknown_mode_is_a_programming_error():
    with pytest.raises(ValueError, match="mode"):
        extract_answer("1", "first_number")
    with pytest.raises(ValueError, match="mode"):
        verify_math("1", "1", mode="nope")


# --------------------------------------------------------------------------------- parse_number


@pytest.mark.parametrize("s, value", [
    ("68", 68), ("-3", -3), ("+4", 4), ("68.0", 68), ("68.", 68), (".5", Fraction(1, 2)),
    ("1,234", 1234), ("-1,234,567.5", Fraction(-2469135, 2)), ("1/2", Fraction(1, 2)),
    ("-3/4", Fraction(-3, 4)), (r"\frac{1}{2}", Fraction(1, 2)), (r"\dfrac{3}{4}", Fraction(3, 4)),
    (r"-\frac{1}{3}", Fraction(-1, 3)), (r"\frac13", Fraction(1, 3)), ("$68$", 68),
    (r"68\text{ cm}", 68), (r"\text{68}", 68), (r"\boxed{12}", 12), ("1{,}000", 1000),
    (" 4 2 ", 42), ("1.5e3", 1500), ("2E-2", Fraction(1, 50)), ("\u22125", -5),
    ("0.1", Fraction(1, 10)),  # exact, not the float 0.1
])
def test_parse_number_accepts(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("s", [
    "", "abc", "٣", "４５", "1٣", "1/0", r"\frac{1}{0}", "1e999999999", "1e101", "1" * 51,
    "9" * 10**6, "1.2.3", "--5", "5-", "x=5", "1,23", "nan", "inf", "0x10", "1_000", "½", "²",
    None, 12,
])
def test_parse_number_rejects(s):
    result, seconds = timed(parse_number, s)
    assert result is None and seconds < 1


# ---------------------------------------------------------------------------------- verify_math


@pytest.mark.parametrize("text, gold, mode, correct", [
    ("so the answer is 68.0", "68", "last_number", True),
    ("that makes 1,234", "1234", "last_number", True),
    ("x = 1/2", "0.5", "last_number", True),
    ("-22", "-22", "last_number", True),
    ("67", "68", "last_number", False),
    (r"\boxed{٦٨}", "68", "boxed", False),  # Arabic-Indic digits are not 68
    (r"\boxed{４５}", "45", "boxed", False),  # nor are fullwidth digits 45
    (r"first \boxed{3} final \boxed{\dfrac{1}{2}}", "0.5", "boxed", True),
    (r"\boxed{3} then \boxed{4}", "3", "boxed", False),  # only the last box counts
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}", "boxed", True),  # non-numeric: normalized string compare
    (r"\boxed{ \left( 1, 2 \right) }", "(1,2)", "boxed", True),
    ("Answer: $68$.", "68", "answer", True),
    ("Answer: 68 apples", "68", "answer", False),
])
def test_verify_math(text, gold, mode, correct):
    verdict = verify_math(text, gold, mode)
    assert verdict.format_ok and verdict.correct is correct


def test_verify_math_without_an_answer():
    assert verify_math("", "1") == Verdict(False, False, None)
    assert verify_math("no number", "1") == Verdict(False, False, None)
    assert verify_math(r"\boxed{}", "1", "boxed") == Verdict(False, False, None)
    assert verify_math(None, "1") == Verdict(False, False, None)
    assert verify_math("٦٨", "68") == Verdict(False, False, None)  # no ASCII number at all


# ----------------------------------------------------------------------------------- safe_arith


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", Fraction(7, 2)), ("-(3 - 5)", 2), ("+4", 4),
    ("0.1 + 0.2", Fraction(3, 10)), ("10 / 4 * 2", 5), ("2 - 3 - 4", -5), ("((((1))))", 1),
    ("6 × 7", 42), ("8 ÷ 2", 4), ("5 \u2212 7", -2), ("1.5 * 2", 3),
    ("(" * 149 + "1" + ")" * 149, 1), ("-" * 120 + "1", 1),
])
def test_safe_arith_values(expr, value):
    assert safe_arith(expr) == value


def test_safe_arith_pow_is_opt_in_and_capped():
    with pytest.raises(ValueError, match="Pow"):
        safe_arith("2 ** 3")
    assert safe_arith("2 ** 3", allow_pow=True) == 8
    assert safe_arith("2 ** -2", allow_pow=True) == Fraction(1, 4)
    assert safe_arith("(1/2) ** 3", allow_pow=True) == Fraction(1, 8)
    for bad in ["2 ** 33", "2 ** 0.5", "0 ** -1", "(2**32) ** 32", "99999 ** 32 * 99999 ** 32"]:
        with pytest.raises(ValueError):
            safe_arith(bad, allow_pow=True)


@pytest.mark.parametrize("expr", [
    "1 / 0", "1 / (2 - 2)", "", "   ", "1 +", "1 2", "05", "1..2", "2(3)", "1e5", "1_000",
    "0x1f", "1j", "True", "'1'", "[1]", "{1}", "1 if 1 else 2", "1 < 2", "1 // 2", "1 % 2",
    "1 << 2", "~1", "1 & 1", "not 1", "1;2", "1\n+2", "9" * 51, "1" + "+1" * 150,
])
def test_safe_arith_rejects(expr):
    with pytest.raises(ValueError):
        safe_arith(expr)


def test_safe_arith_node_limit():
    expr = "+".join(["1"] * 130)  # short enough, but 389 syntax nodes
    assert len(expr) <= MAX_EXPR_CHARS
    with pytest.raises(ValueError, match="syntax nodes"):
        safe_arith(expr)


def test_safe_arith_rejects_values_that_grow_too_large():
    # Each power is allowed (531 bits); their product (1062 bits) is over MAX_VALUE_BITS. Without
    # powers, MAX_EXPR_CHARS already keeps every value far below the limit.
    assert safe_arith("99999 ** 32", allow_pow=True) == 99999**32
    with pytest.raises(ValueError, match="bits"):
        safe_arith("(99999 ** 32) * (99999 ** 32)", allow_pow=True)


# Code that must never run. Each is rejected by the character gate; the second test checks that
# the AST allow-list alone would also reject it.
ATTACKS = [
    "__import__('os').system('echo hi')",
    "().__class__.__bases__[0].__subclasses__()",
    "(lambda: 1)()",
    "open('PWNED', 'w')",
    "x",
    "[x for x in range(10**9)]",
    "'a' * 10**9",
    "print(1)",
    "exec('1')",
    "1 if True else 2",
]


@pytest.mark.parametrize("attack", ATTACKS + ["9**9**9**9", "2 ** 10 ** 10"])
def test_named_attacks_are_rejected_promptly(attack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for allow_pow in (False, True):
        result, seconds = timed(safe_arith, attack, allow_pow=allow_pow)
        assert isinstance(result, ValueError) and seconds < 1
    for text in (f"Answer: {attack}", f"<answer>{attack}</answer>", f"\\boxed{{{attack}}}"):
        verdict, seconds = timed(verify_countdown, text, [9, 9, 9, 9], 1)
        assert isinstance(verdict, Verdict) and not verdict.correct and seconds < 1
        for mode in V.MODES:
            verdict, seconds = timed(verify_math, text, "1", mode)
            assert isinstance(verdict, Verdict) and seconds < 1
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize("attack", ATTACKS + ["2 ** 3", "1 // 2", "-1"])
def test_allow_list_alone_rejects_attacks(attack):
    """Bypass the character gate: hand the evaluator a tree parsed straight from the attack."""
    tree = ast.parse(attack, mode="eval")
    evaluate = V._Evaluator(attack, allow_pow=False, deadline=time.monotonic() + 1)
    if attack == "-1":  # sanity: the evaluator does accept allowed trees
        assert evaluate(tree) == -1
        return
    with pytest.raises(ValueError):
        evaluate(tree)


# --------------------------------------------------------------------------------- huge inputs

HUGE = {
    "digits": "9" * 10**6,
    "open parens": "(" * 10**6,
    "boxes": "\\boxed{" * 150_000,
    "answer lines": "Answer: " * 125_000,
    "answer tags": "<answer>" * 125_000,
    "minus signs": "-" * 10**6 + "1",
    "commas": "1," * 500_000,
    "spaces then answer": " " * 10**6 + "Answer:",
    "nested boxes": "\\boxed{" * 100_000 + "1" + "}" * 100_000,
    "unicode digits": "٣" * 10**6,
}


@pytest.mark.parametrize("name", HUGE)
def test_huge_inputs_return_promptly(name):
    text = HUGE[name]
    for mode in V.MODES:
        verdict, seconds = timed(verify_math, text, "1", mode)
        assert isinstance(verdict, Verdict) and seconds < 1, (mode, seconds)
        if verdict.answer is not None:
            assert len(verdict.answer) <= V.MAX_ANSWER_CHARS
    verdict, seconds = timed(verify_countdown, text, [1, 2, 3], 6)
    assert verdict.correct is False and seconds < 1
    result, seconds = timed(parse_number, text)
    assert result is None and seconds < 1
    result, seconds = timed(safe_arith, text, allow_pow=True)
    assert isinstance(result, ValueError) and seconds < 1


def test_huge_answers_are_rejected_not_truncated():
    # Truncating "68<200 spaces>junk" to 200 characters would leave a "correct" 68.
    assert verify_math("Answer: 68" + " " * 300 + "junk", "68", "answer").format_ok is False
    assert verify_math("\\boxed{68" + " " * 300 + "junk}", "68", "boxed").format_ok is False


# ------------------------------------------------------------------------------------ deadline


def run_in_thread(fn, *args, **kwargs):
    out = {}

    def target():
        out["result"], out["seconds"] = timed(fn, *args, **kwargs)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive()
    return out["result"], out["seconds"]


def test_safe_arith_works_in_a_worker_thread():
    result, _ = run_in_thread(safe_arith, "(1 + 2) * 3")
    assert result == 9


def test_deadline_in_worker_thread_real_clock():
    # The heaviest kind of allowed input: large powers multiplied together. The deadline covers
    # parsing too, so a 1 microsecond budget is always exceeded by the first node.
    expr = "*".join(["(7 ** 32)"] * 4)
    assert safe_arith(expr, allow_pow=True) == Fraction(7) ** 128
    result, seconds = run_in_thread(safe_arith, expr, allow_pow=True, deadline_s=1e-6)
    assert isinstance(result, ValueError) and "deadline" in str(result) and seconds < 1


def test_deadline_in_worker_thread_slow_clock(monkeypatch):
    """A clock that jumps 10 ms per reading simulates a machine too slow to finish in 100 ms:
    the walk must stop part-way, from a thread, without signals."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(V, "_clock", lambda: next(ticks) * 0.01)
    expr = "+".join(["1"] * 60)  # 119 nodes to visit, the deadline is hit after ~10
    result, seconds = run_in_thread(safe_arith, expr, deadline_s=0.1)
    assert isinstance(result, ValueError) and "deadline" in str(result) and seconds < 1
    assert next(ticks) < 30  # it stopped early instead of visiting every node


# ---------------------------------------------------------------------------------- countdown


@pytest.mark.parametrize("text, format_ok, correct", [
    ("Answer: (44 + 19) + 35", True, True),
    ("Answer: 44 + 19 + 35 = 98", True, True),  # trailing "= target" is dropped
    ("Answer: $35 + 44 + 19 = 98$.", True, True),
    ("<answer> 44 + 19 + 35 </answer>", True, True),
    ("<answer>44+19+35</answer>\nAnswer: 1 + 1", True, True),  # the tag wins over "Answer:"
    ("Answer: 1 + 1\n<answer>44+19+35</answer>", True, True),
    ("Answer: 44 × 19 - 35 * 21", True, False),
    ("Answer: 44, 19, 35", False, False),  # listing the numbers is not an equation
    ("Answer: 44 19 35", False, False),
    ("Answer: 44 + 44 + 10", True, False),  # a number used twice, one missing
    ("Answer: 44 + 19 + 35 + 0", True, False),  # an extra literal
    ("Answer: 44 + 19 + 35 * 1", True, False),
    ("Answer: 44 + 19 + 35.0", True, False),  # decimal literal
    ("Answer: 44 + 19 + 35 / 0", True, False),  # division by zero
    ("Answer: 44 + 19 - 35", True, False),  # wrong value
    ("Answer: 44 + 19 + 35 = 97", False, False),  # "= something else" is not dropped
    ("Answer: 98", True, False),
    ("Answer:", False, False),
    ("no answer at all", False, False),
    ("", False, False),
])
def test_verify_countdown(text, format_ok, correct):
    verdict = verify_countdown(text, [44, 19, 35], 98)
    assert (verdict.format_ok, verdict.correct) == (format_ok, correct)


def test_verify_countdown_exact_fractions():
    assert verify_countdown("Answer: 7 / (1 - 5 / 6)", [7, 1, 5, 6], 42).correct  # 7 / (1/6)
    assert verify_countdown("Answer: (2 / 3) * 3 * 6", [2, 3, 3, 6], 12).correct
    assert verify_countdown("Answer: 7 / 2", [7, 2], 3).correct is False  # 3.5 != 3


def test_verify_countdown_multiset_of_numbers():
    assert verify_countdown("Answer: 5 * 5 + 1", [5, 1, 5], 26).correct
    assert not verify_countdown("Answer: 5 * 5 + 1", [5, 1, 2], 26).correct


def test_countdown_numbers_used():
    assert countdown_numbers_used("(44 + 19) * 35") == [44, 19, 35]
    assert countdown_numbers_used("-(3) - -(4)") == [3, 4]
    for bad in ["1.5 + 2", "a + 1", "2 ** 3", "1 +"]:
        with pytest.raises(ValueError):
            countdown_numbers_used(bad)


# ------------------------------------------------------------------------------------- fuzzing

TOKENS = ["0", "7", "42", "-", "+", "*", "/", ".", ",", " ", "\n", "(", ")", "{", "}", "$",
          "\\boxed{", "\\frac", "\\text{", "Answer:", "<answer>", "</answer>", "=", "e", "٣", "４",
          "\u2212", "×", "**", "\\", "x"]
texty = st.one_of(st.text(max_size=300),
                  st.lists(st.sampled_from(TOKENS), max_size=80).map("".join))


@FUZZ
@given(text=texty, gold=st.one_of(st.text(max_size=20), st.integers().map(str)))
def test_fuzz_verifiers_never_raise(text, gold):
    for mode in V.MODES:
        verdict = verify_math(text, gold, mode)
        assert isinstance(verdict, Verdict)
        assert verdict.format_ok or not verdict.correct
        answer = extract_answer(text, mode)
        assert answer == verdict.answer
    verdict = verify_countdown(text, [1, 2, 3], 6)
    assert isinstance(verdict, Verdict) and (verdict.format_ok or not verdict.correct)
    assert parse_number(text) is None or isinstance(parse_number(text), Fraction)
    try:
        assert isinstance(safe_arith(text, allow_pow=True), Fraction)
    except ValueError:
        pass


def trees(max_leaves=16):
    leaf = st.integers(min_value=0, max_value=999)
    return st.recursive(
        leaf,
        lambda sub: st.one_of(
            st.tuples(st.sampled_from("+-*/"), sub, sub),
            st.tuples(st.just("neg"), sub),
        ),
        max_leaves=max_leaves,
    )


def render(t) -> str:
    if isinstance(t, int):
        return str(t)
    if t[0] == "neg":
        return f"-({render(t[1])})"
    return f"({render(t[1])} {t[0]} {render(t[2])})"


def reference_value(t) -> Fraction:
    """Independent evaluation; ZeroDivisionError propagates."""
    if isinstance(t, int):
        return Fraction(t)
    if t[0] == "neg":
        return -reference_value(t[1])
    a, b = reference_value(t[1]), reference_value(t[2])
    if t[0] == "/":
        return a / b  # Fraction raises ZeroDivisionError for b == 0
    return {"+": a + b, "-": a - b, "*": a * b}[t[0]]


@FUZZ
@given(trees())
def test_fuzz_safe_arith_matches_fraction_arithmetic(tree):
    expr = render(tree)
    try:
        expected = reference_value(tree)
    except ZeroDivisionError:
        with pytest.raises(ValueError, match="zero"):
            safe_arith(expr)
        return
    if len(expr) > MAX_EXPR_CHARS:
        with pytest.raises(ValueError, match="longer"):
            safe_arith(expr)
        return
    assert safe_arith(expr, deadline_s=10) == expected


@FUZZ
@given(st.fractions(min_value=-10**12, max_value=10**12, max_denominator=10**6))
def test_fuzz_parse_number_roundtrip_fraction(value):
    assert parse_number(str(value)) == value


@FUZZ
@given(st.decimals(min_value=-10**9, max_value=10**9, places=4, allow_nan=False,
                   allow_infinity=False))
def test_fuzz_parse_number_roundtrip_decimal(value):
    assert parse_number(str(value)) == Fraction(value)


@FUZZ
@given(st.integers(min_value=-10**15, max_value=10**15), st.sampled_from(["{:d}", "{:,d}"]))
def test_fuzz_last_number_finds_the_answer(n, fmt):
    text = f"Let me think. 3 + 4 = 7, so the answer is {fmt.format(n)}."
    assert verify_math(text, str(n)).correct
    assert not verify_math(text, str(n + 1)).correct

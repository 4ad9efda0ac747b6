"""Tests for shared/verifiers.py: extraction, exact number parsing, a graded table of realistic
answers, safe arithmetic, Countdown, named attacks, huge inputs, thread-safe deadlines, and
hypothesis fuzzing.

The attack and huge-input tests bound work, not wall time, so that a loaded machine cannot make
them fail: the `work` fixture counts the characters handed to each of the module's regexes, the
reads of its deadline clock (one per syntax node; the clock is frozen, so only the size limits can
stop the work) and the size of every power computed. Their one timing check is a backstop on the
CPU time of the calling thread (`time.thread_time`, which does not grow while other processes
hold the cores), 2 s for calls that take microseconds to milliseconds.
"""

import ast
import re
import sys
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


CPU_BACKSTOP_S = 2.0  # CPU seconds of the calling thread; the calls checked take µs to ms


def timed(fn, *args, **kwargs):
    """(result or raised exception, CPU seconds of this thread)."""
    start = time.thread_time()
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the caller checks which
        result = e
    return result, time.thread_time() - start


class CountingPattern:
    """Stands in for one of the module's compiled regexes and logs how many characters each call
    is given (from pos to endpos)."""

    def __init__(self, pattern: re.Pattern, log: list):
        self.pattern, self.log = pattern, log

    def _scan(self, method, string, pos=0, endpos=sys.maxsize):
        self.log.append(max(0, min(endpos, len(string)) - pos))
        return getattr(self.pattern, method)(string, pos, endpos)

    def match(self, *args):
        return self._scan("match", *args)

    def fullmatch(self, *args):
        return self._scan("fullmatch", *args)

    def search(self, *args):
        return self._scan("search", *args)

    def finditer(self, *args):
        return self._scan("finditer", *args)

    def sub(self, repl, string, count=0):
        self.log.append(len(string))
        return self.pattern.sub(repl, string, count)


class NoRegexModule:
    def __getattr__(self, name):
        raise AssertionError(f"re.{name} called at run time: regex work must use the module's "
                             f"compiled patterns, which the work fixture counts")


class Work:
    """What one call cost, counted instead of timed."""

    def __init__(self):
        self.regex_chars: list[int] = []  # characters handed to each regex call
        self.clock_reads = 0  # reads of V._clock: one per syntax node visited, plus one
        self.pow_bits: list[int] = []  # bits(base) * |exponent| of every Fraction power

    def reset(self):
        self.regex_chars.clear()
        self.clock_reads = 0
        self.pow_bits.clear()


@pytest.fixture
def work(monkeypatch):
    w = Work()
    for name, value in list(vars(V).items()):
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(V, name, CountingPattern(value, w.regex_chars))
    monkeypatch.setattr(V, "re", NoRegexModule())

    def frozen_clock():
        w.clock_reads += 1
        return 0.0  # the deadline never passes: only the size limits can stop the work

    monkeypatch.setattr(V, "_clock", frozen_clock)
    real_pow = Fraction.__pow__

    def guarded_pow(a, b, *rest):
        if isinstance(b, int) or (isinstance(b, Fraction) and b.denominator == 1):
            bits = max(Fraction(a).numerator.bit_length(), Fraction(a).denominator.bit_length())
            w.pow_bits.append(bits * abs(int(b)))
            if w.pow_bits[-1] > V.MAX_VALUE_BITS:  # refuse: computing it could take minutes
                raise AssertionError(f"a power of about {w.pow_bits[-1]} bits was computed")
        return real_pow(a, b, *rest)

    monkeypatch.setattr(Fraction, "__pow__", guarded_pow)
    return w


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
    ("**Answer:**\n\n42", "42"),  # markdown bold, answer on the next line
    ("**Answer:** **42**", "42"),
    ("The answer is 5", None),
    ("Answer:", None),
    ("**Answer:**", None),
])
def test_extract_answer_line(text, expected):
    assert extract_answer(text, "answer") == expected


@pytest.mark.parametrize("text, expected", [
    ("Answer: 42", "42"),
    ("Answer: 42\nI hope this helps! (It took 7 steps.)", "42"),  # a remark on the next line
    ("Answer: 42 apples, 7 left over", "42"),  # ... or on the same line: the first number
    ("Answer: 6 * 7 = 42", "42"),  # a leading "<arithmetic> =" is skipped
    ("Answer: (3 + 4) \\times 6 = 42", "42"),
    ("Answer: x = 2 + 3 = 5", "5"),
    ("Answer: 40 (6 * 7 = 42, minus 2)", "40"),  # an '=' inside parentheses is a remark's
    ("Answer: 18. She had 16 - 3 - 4 = 9 eggs.", "18"),  # an '=' after words is a remark's
    ("Answer: \\$1{,}234", "\\$1{,}234"),  # a whole line that is a number is kept whole
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}"),
    ("Answer: 1, 234", "1"),  # not a number as a whole: its first number
    ("Answer: 3\nAnswer: 4", "4"),  # the last Answer line
    ("Answer: four\nso 2 + 2 = 4", None),  # an Answer line without a number: no fallback
    ("so 2 + 2 = 4.", "4"),  # no Answer line: the last number
    ("no digits at all", None),
    ("Answer: " + "9" * (V.MAX_ANSWER_CHARS + 1), None),  # too long
])
def test_extract_answer_or_last_number(text, expected):
    assert extract_answer(text, "answer_or_last_number") == expected


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
    ("1.5e3", 1500), ("2E-2", Fraction(1, 50)), ("\u22125", -5),
    ("0.1", Fraction(1, 10)),  # exact, not the float 0.1
    (r"\$18", 18), (r"\$1{,}250.50", Fraction(2501, 2)), ("18$", 18), (r"12\%", 12), ("12%", 12),
    (r"30^\circ", 30), (r"30^{\circ}", 30), ("30\u00b0", 30), ("x = 5", 5), ("x=5", 5),
    (r"\theta = 45^\circ", 45), ("x_1 = -2", -2), (r"5\text{ cm}^2", 5), (r"1,\!234", 1234),
    (r"1\,234", 1234), (r"2\frac{1}{2}", Fraction(5, 2)), (r"-1\tfrac13", Fraction(-4, 3)),
    (r"\text{ 7 }", 7), ("7 .", 7), (r"\mbox{7}\,", 7),
])
def test_parse_number_accepts(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("s", [
    "", "abc", "٣", "４５", "1٣", "1/0", r"\frac{1}{0}", "1e999999999", "1e101", "1" * 51,
    "9" * 10**6, "1.2.3", "--5", "5-", "1,23", "nan", "inf", "0x10", "1_000", "½", "²",
    None, 12,
    " 4 2 ", "6 8", "1, 234", "1 ,234", r"5\text{ or }6", r"5\text{ and }6",  # no gluing
    r"2\frac{3}{2}", r"2\frac{0}{2}",  # a mixed number needs a proper fraction
    "ab = 5", "x == 5", "x =", r"\text{5 cm}", "5 cm", "1 2/3",
])
def test_parse_number_rejects(s, work):
    result, seconds = timed(parse_number, s)
    assert result is None and seconds < CPU_BACKSTOP_S
    if not isinstance(s, str) or len(s) > V.MAX_ANSWER_CHARS:
        assert work.regex_chars == []  # refused before any regex ran
    else:
        assert max(work.regex_chars, default=0) <= len(s)


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


# ------------------------------------------------------------------------------- graded answers
# Realistic final answers with the verdict a careful grader gives. "RULE:" marks a case where we
# chose a convention another grader could decide differently; the verifier follows the rule.
# Modes: math500 uses "boxed", gsm8k "answer_or_last_number", arith "last_number", and "answer"
# is the DAPO convention (the whole rest of the "Answer:" line is the answer).
B, A, G, L = "boxed", "answer", "answer_or_last_number", "last_number"

GRADED = [
    # --- boxed LaTeX (MATH-500)
    (r"The answer is $\boxed{18}$.", "18", B, True),
    (r"So the total is $\boxed{\$18}$.", "18", B, True),  # \$ is a dollar sign
    (r"\boxed{\$18.00}", "18", B, True),
    (r"\boxed{\$1{,}250}", "1250", B, True),
    (r"\boxed{18.90}", r"\$18.90", B, True),  # MATH golds carry the \$ too
    (r"\boxed{18\$}", "18", B, True),
    (r"\boxed{12\%}", "12", B, True),
    (r"\boxed{12\%}", r"12\%", B, True),
    (r"\boxed{12}", r"12\%", B, True),
    (r"\boxed{12 \%}", "12", B, True),
    (r"\boxed{12\%}", "0.12", B, False),  # RULE: 12\% reads as 12 (MATH's golds drop the %)
    (r"\boxed{13\%}", "12", B, False),
    (r"\boxed{30^\circ}", "30", B, True),
    (r"\boxed{30^{\circ}}", r"30^\circ", B, True),
    (r"\boxed{30°}", "30", B, True),
    (r"\boxed{150^\circ}", "30", B, False),
    (r"\boxed{x = 5}", "5", B, True),
    (r"\boxed{x=-3}", "-3", B, True),
    (r"\boxed{n = 12}", "12", B, True),
    (r"\boxed{y = 2x + 3}", "2x+3", B, True),  # a leading "y =" goes for text answers too
    (r"\boxed{x = 5}", "6", B, False),
    (r"\boxed{x \le 5}", "5", B, False),  # an inequality is not "x = 5"
    (r"\boxed{5\text{ or }6}", "56", B, False),  # text between numbers never glues them
    (r"\boxed{5\text{ or }6}", "5", B, False),  # a hedge is not an answer
    (r"\boxed{6 8}", "68", B, False),
    (r"\boxed{1, 234}", "1234", B, False),  # "1, 234" is a list, not a thousands separator
    (r"\boxed{1,234}", "1234", B, True),
    (r"\boxed{1{,}234}", "1234", B, True),
    (r"\boxed{1,\!234}", "1234", B, True),
    (r"\boxed{1\,234}", "1234", B, True),  # \, is LaTeX's thousands thin space
    (r"\boxed{10,\!080}", r"10,\!080", B, True),
    (r"\boxed{68\text{ cm}}", "68", B, True),  # a trailing \text{} without digits is a unit
    (r"\boxed{68 \text{ cm}}", "68", B, True),
    (r"\boxed{24\text{ cm}^2}", "24", B, True),
    (r"\boxed{18 \text{ dollars}}", "18", B, True),
    (r"\boxed{10}", r"10\text{ inches}", B, True),  # units on the gold side too
    (r"\boxed{\text{68}}", "68", B, True),
    (r"\boxed{5\text{ and }7}", "57", B, False),
    (r"\boxed{\frac{3}{4}}", "0.75", B, True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", B, True),
    (r"\boxed{\tfrac{3}{4}}", "3/4", B, True),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", B, True),  # equal values; not asked to simplify
    (r"\boxed{\frac{3}{5}}", r"\frac{3}{4}", B, False),
    (r"\boxed{-\frac{1}{2}}", "-0.5", B, True),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}", B, True),
    (r"\boxed{\frac{1}{2}}", r"-\frac{1}{2}", B, False),
    (r"\boxed{2\frac{1}{2}}", r"\frac{5}{2}", B, True),  # RULE: N\frac{a}{b}, a < b, is mixed
    (r"\boxed{2 \frac{1}{2}}", "2.5", B, True),
    (r"\boxed{-1\frac{1}{3}}", r"-\frac{4}{3}", B, True),
    (r"\boxed{2\frac{1}{2}}", "1", B, False),  # RULE: not 2 times 1/2
    (r"\boxed{\frac{1}{0}}", "0", B, False),
    (r"\boxed{0.5}", r"\frac12", B, True),
    (r"\boxed{.5}", "1/2", B, True),
    (r"\boxed{5.}", "5", B, True),
    (r"The answer is \boxed{5}.", "5.0", B, True),
    (r"\boxed{-5}", "-5", B, True),
    ("\\boxed{\u22125}", "-5", B, True),  # Unicode minus sign
    (r"\boxed{- 5}", "-5", B, True),
    (r"\boxed{5}", "-5", B, False),
    (r"\boxed{(1, 2)}", "(1,2)", B, True),
    (r"\boxed{\left( 3, -\frac{1}{2} \right)}", r"(3,-\frac{1}{2})", B, True),
    (r"\boxed{(2, 1)}", "(1,2)", B, False),  # a tuple is ordered
    (r"\boxed{[1, 2)}", "[1,2)", B, True),
    (r"\boxed{(1, 2)}", "[1,2]", B, False),  # open and closed intervals differ
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", B, True),
    (r"\boxed{-2, 1}", "-2,1", B, True),
    (r"\boxed{\sqrt{2}}", r"\sqrt2", B, True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", B, True),
    (r"\boxed{2\sqrt{3}}", r"2\sqrt{3}", B, True),
    (r"\boxed{2\sqrt{3}}", "2", B, False),
    (r"\boxed{3\pi}", "3", B, False),
    (r"\boxed{\pi}", r"\pi", B, True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", B, True),
    (r"\boxed{\textbf{(C)}}", r"\text{(C)}", B, True),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", B, False),
    (r"first \boxed{3}, on reflection \boxed{4}", "3", B, False),  # the last box counts
    (r"\boxed{\boxed{7}}", "7", B, True),
    ("\\boxed{\u0663}", "3", B, False),  # an Arabic-Indic digit is not ASCII 3
    (r"\boxed{}", "0", B, False),
    ("The answer is 18.", "18", B, False),  # no box in a boxed task
    # --- the "Answer:" line, whole (DAPO convention)
    ("Answer: 68", "68", A, True),
    ("**Answer:** $68$", "68", A, True),
    ("**Answer:**\n68", "68", A, True),
    ("Answer: \\$18", "18", A, True),
    ("Answer: x = 5", "5", A, True),
    ("Answer: 1,234", "1234", A, True),
    ("Answer: 1, 234", "1234", A, False),
    ("Answer: 68 apples", "68", A, False),  # RULE: plain words are no unit ("3 pi" is not 3)
    # --- GSM8K: the number on the last "Answer:" line, else the last number
    ("16 - 3 - 4 = 9 eggs, and 9 * 2 = 18.\nAnswer: 18", "18", G, True),
    ("Answer: 42\nI hope this helps! It took 7 steps.", "42", G, True),  # remark after it
    ("Answer: 42 (6 * 7)", "42", G, True),
    ("Answer: 18 eggs\n(That is 9 eggs at $2.)", "18", G, True),
    ("Answer: $18", "18", G, True),
    ("Answer: \\$18.00", "18", G, True),
    ("Answer: 18 dollars", "18", G, True),
    ("Answer: 18.", "18", G, True),
    ("**Answer:** 18", "18", G, True),
    ("**Answer:**\n\n18", "18", G, True),
    ("Answer: \\boxed{18}", "18", G, True),
    ("Answer: 9 * 2 = 18", "18", G, True),
    ("Answer: (16 - 3 - 4) × 2 = 18", "18", G, True),
    ("Answer: x = 18", "18", G, True),
    ("Answer: 18. She has 16 - 3 - 4 = 9 eggs and sells each for $2.", "18", G, True),
    ("Answer: 40 (6 × 7 = 42, minus 2)", "40", G, True),
    ("Answer: 1,234", "1234", G, True),
    ("Answer: 100,000 people", "100000", G, True),
    ("Answer: 1, 234", "1234", G, False),
    ("Answer: 6 8", "68", G, False),
    ("Answer: -5", "-5", G, True),
    ("Answer: 25%", "25", G, True),
    ("Answer: 3/4", "0.75", G, True),
    ("Answer: 1.5 hours", "1.5", G, True),
    ("Answer: 17\nWait, 9 * 2 = 18.", "18", G, False),  # the committed answer is 17
    ("Answer: 17\nAnswer: 18", "18", G, True),  # the last Answer line counts
    ("Answer: eighteen", "18", G, False),  # no number on the Answer line, no fallback
    ("Answer: 18 or 19", "19", G, False),
    ("Answer: 18 or 19", "18", G, True),  # RULE: the first number; a hedge scores as its first
    ("So she has 3 + 4 = 7 apples left.", "7", G, True),  # no Answer line: the last number
    ("She earns $18 every day.", "18", G, True),
    # --- last number (arith)
    ("23 + 45 = 68", "68", L, True),
    ("The answer is 68.", "68", L, True),
    ("68\n\nI hope this helps", "68", L, True),
    ("23 + 45 = 69", "68", L, False),
    ("It is 1,234.", "1234", L, True),
    ("It is -22.", "-22", L, True),
]


@pytest.mark.parametrize("text, gold, mode, correct", GRADED)
def test_graded_answers(text, gold, mode, correct):
    assert verify_math(text, gold, mode).correct is correct


# Answers a careful grader accepts and this verifier does not: it has no symbolic algebra, and a
# missed right answer costs less than a wrong one accepted. strict: fixing one shows up here.
KNOWN_MISSES = [
    (r"\boxed{\sqrt{4}}", "2", B),
    (r"\boxed{2^{10}}", "1024", B),
    (r"\boxed{0.\overline{3}}", r"\frac{1}{3}", B),
    (r"\boxed{1 2/3}", r"\frac{5}{3}", B),  # only the LaTeX mixed number is read
    (r"\boxed{\text{5 cm}}", "5", B),  # a unit inside the same \text as the number
    (r"\boxed{68 cm}", "68", B),  # plain words are no unit
    (r"\boxed{C}", r"\text{(C)}", B),
    (r"\boxed{x = 2, y = 3}", "(2,3)", B),
]


@pytest.mark.xfail(strict=True, reason="known miss; see KNOWN_MISSES")
@pytest.mark.parametrize("text, gold, mode", KNOWN_MISSES)
def test_known_misses(text, gold, mode):
    assert verify_math(text, gold, mode).correct


def test_gsm8k_task_grades_the_answer_line(monkeypatch):
    """The GSM8K prompt asks for "Answer: <number>"; a remark after that line must not count."""
    from shared import tasks as T

    rows = [{"question": "Q?", "answer": "6 * 7 = 42\n#### 42"}] * 2
    monkeypatch.setattr(T, "_load_hub_dataset", lambda task, path, config=None: {
        "train": rows, "test": rows})
    task = T.load_task("gsm8k", n_train=1, n_test=1)
    problem = task.test[0]
    assert task.reward("6 * 7 = 42.\nAnswer: 42\nThat took 7 steps.", problem) == 1.0
    assert task.reward("Answer: 41\nOr maybe 6 * 7 = 42.", problem) == 0.0
    assert task.reward("So it is 42.", problem) == 1.0  # no Answer line: the last number


# math-verify (Hugging Face's sympy-based grader) as a second opinion on the boxed cases. Test
# only: it calls sympy on the text, which training code must never do. Each disagreement is
# listed with its reason; a new one fails the test.
MATH_VERIFY_DISAGREES = {  # (text, gold): why (math-verify 0.9.0)
    (r"\boxed{12\%}", "0.12"): "our RULE; math-verify lets 12% equal both 12 and 0.12",
    (r"\boxed{30°}", "30"): "math-verify does not read the ° sign",
    (r"\boxed{1\,234}", "1234"): "math-verify reads 1\\,234 as 1 + 234 = 235",
    (r"\boxed{5.}", "5"): "math-verify does not read a trailing period",
    ("The answer is 18.", "18"): "math-verify needs no box; a boxed task does",
}


def test_boxed_verdicts_against_math_verify():
    math_verify = pytest.importorskip("math_verify")
    disagree = {}
    for text, gold, mode, correct in GRADED:
        if mode != B:
            continue
        theirs = bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(text)))
        if theirs != correct:
            disagree[(text, gold)] = theirs
    assert set(disagree) <= set(MATH_VERIFY_DISAGREES), {
        k: v for k, v in disagree.items() if k not in MATH_VERIFY_DISAGREES}


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
def test_named_attacks_are_rejected_with_bounded_work(attack, tmp_path, monkeypatch, work):
    """With the deadline clock frozen, the size limits alone stop every attack: few nodes are
    visited and no power over MAX_VALUE_BITS is computed (9**9**9**9 stops at 9 ** 387420489)."""
    monkeypatch.chdir(tmp_path)
    for allow_pow in (False, True):
        work.reset()
        result, seconds = timed(safe_arith, attack, allow_pow=allow_pow)
        assert isinstance(result, ValueError) and seconds < CPU_BACKSTOP_S
        # one read to start, one for the Expression root, then at most one per character
        assert work.clock_reads <= len(attack) + 2
        assert max(work.pow_bits, default=0) <= V.MAX_VALUE_BITS
    for text in (f"Answer: {attack}", f"<answer>{attack}</answer>", f"\\boxed{{{attack}}}"):
        work.reset()
        verdict, seconds = timed(verify_countdown, text, [9, 9, 9, 9], 1)
        assert isinstance(verdict, Verdict) and not verdict.correct and seconds < CPU_BACKSTOP_S
        assert work.clock_reads <= len(attack) + 2
        for mode in V.MODES:
            verdict, seconds = timed(verify_math, text, "1", mode)
            assert isinstance(verdict, Verdict) and seconds < CPU_BACKSTOP_S
        assert sum(work.regex_chars) <= 100 * len(text)  # a few passes over a short text
    assert list(tmp_path.iterdir()) == []  # nothing ran


@pytest.mark.parametrize("attack", ATTACKS + ["2 ** 3", "1 // 2", "-1"])
def test_allow_list_alone_rejects_attacks(attack):
    """Bypass the character gate: hand the evaluator a tree parsed straight from the attack."""
    tree = ast.parse(attack, mode="eval")
    evaluate = V._Evaluator(attack, allow_pow=False, deadline=time.monotonic() + 3600)
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
    "answer then spaces": "Answer:" + " " * 10**6,
    "answer then stars": "Answer:" + "*" * 10**6,
    "answer then equations": "Answer: " + "(1)+1=" * 160_000,
    "units": "1" + "\\text{ cm}" * 100_000,
}


@pytest.mark.parametrize("name", HUGE)
def test_huge_inputs_cost_bounded_work(name, work):
    """Whatever the input's length, each regex sees at most the MAX_TEXT_CHARS tail, a few
    regex passes are made, and parse_number and safe_arith refuse before any regex runs."""
    text = HUGE[name]
    limit = V.MAX_TEXT_CHARS
    for mode in V.MODES:
        work.reset()
        verdict, seconds = timed(verify_math, text, "1", mode)
        assert isinstance(verdict, Verdict) and seconds < CPU_BACKSTOP_S, (mode, seconds)
        if verdict.answer is not None:
            assert len(verdict.answer) <= V.MAX_ANSWER_CHARS
        assert max(work.regex_chars) <= limit and sum(work.regex_chars) <= 4 * limit, mode
    work.reset()
    verdict, seconds = timed(verify_countdown, text, [1, 2, 3], 6)
    assert verdict.correct is False and seconds < CPU_BACKSTOP_S
    assert max(work.regex_chars) <= limit and sum(work.regex_chars) <= 4 * limit
    work.reset()
    result, seconds = timed(parse_number, text)
    assert result is None and seconds < CPU_BACKSTOP_S and work.regex_chars == []
    result, seconds = timed(safe_arith, text, allow_pow=True)
    assert isinstance(result, ValueError) and seconds < CPU_BACKSTOP_S
    assert work.regex_chars == [] and work.clock_reads <= 1  # refused on length, nothing parsed


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
    worker.join(timeout=60)  # a backstop against a hang; a working call returns in microseconds
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
    assert isinstance(result, ValueError) and "deadline" in str(result) and seconds < CPU_BACKSTOP_S


def test_deadline_in_worker_thread_slow_clock(monkeypatch):
    """A clock that jumps 10 ms per reading simulates a machine too slow to finish in 100 ms:
    the walk must stop part-way, from a thread, without signals."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(V, "_clock", lambda: next(ticks) * 0.01)
    expr = "+".join(["1"] * 60)  # 119 nodes to visit, the deadline is hit after ~10
    result, seconds = run_in_thread(safe_arith, expr, deadline_s=0.1)
    assert isinstance(result, ValueError) and "deadline" in str(result) and seconds < CPU_BACKSTOP_S
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
          "\u2212", "×", "**", "\\", "x", "\\%", "%", "^\\circ", "\\$", "x = ",
          "\\text{ or }", "\\text{ cm}", "\\,", "{,}", "\\frac{1}{2}", "°", "~"]
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

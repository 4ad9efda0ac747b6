r"""Exact step-by-step checking of arithmetic solutions (the `multistep` task's process signal).

A solution is read line by line. A line with an "=" is a step; other lines (prose, "Answer: 52")
are not. From each step the arithmetic is taken out of the surrounding words ("So 19 * 3 = 57."
-> "19 * 3 = 57"), split at "=" into sides, and every side is evaluated exactly with
`shared.verifiers.safe_arith` (AST allow-list, Fractions, size and time bounds; nothing is executed).

    arithmetic_ok  every side of the step has the same value ("12 + 7 = 19", "14 + 3 * 5 = 14 + 15 = 29")
    grounded       every number written on the first side is a number of the problem or a number
                   that appeared in an earlier step (its sides or their values): no invented numbers
    first_error    the index of the first step that is not both

The checker is for rewards and analysis of untrusted model text, so it is bounded like the
verifiers: only the first MAX_TEXT_CHARS characters and the first MAX_STEPS steps are read, a side
longer than the verifiers' MAX_EXPR_CHARS is a wrong step (never truncated), and deeply nested input
is refused by `safe_arith`'s node limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

from shared.verifiers import MAX_EXPR_CHARS, MAX_TEXT_CHARS, parse_number, safe_arith

MAX_STEPS = 64  # steps read per solution
MAX_SIDES = 8  # "a = b = c ...": a step with more sides than this is not checked (it is wrong)
_ARITH_CHARS = frozenset("0123456789+-*/×÷−(). \t")
_LIST_MARKER = re.compile(r"^\s*(?:step\s*[0-9]{1,3}\s*[:.)]|[0-9]{1,3}[.)](?=\s)|[-*•])\s*", re.IGNORECASE)
_LITERAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


@dataclass(frozen=True)
class StepCheck:
    text: str  # the step's equation as read ("19 * 3 = 57")
    arithmetic_ok: bool  # all sides parse and have the same exact value
    grounded: bool  # the first side uses only numbers of the problem or of earlier steps
    value: Fraction | None  # the value of the last side (None if it does not parse)

    @property
    def ok(self) -> bool:
        return self.arithmetic_ok and self.grounded


@dataclass(frozen=True)
class StepReport:
    steps: tuple[StepCheck, ...]
    first_error: int | None  # index of the first step that is not ok; None if every step is ok

    @property
    def all_ok(self) -> bool:
        return bool(self.steps) and self.first_error is None


def split_steps(text: str) -> list[str]:
    """The equations of `text`, one per line that has an "=" (at most MAX_STEPS), with the words
    around them and list markers ("1.", "Step 2:", "-") removed: "So 19 * 3 = 57." -> "19 * 3 = 57"."""
    if not isinstance(text, str):
        return []
    steps = []
    for line in text[:MAX_TEXT_CHARS].splitlines():
        if "=" in line:
            steps.append(_equation(_LIST_MARKER.sub("", line, count=1)))
            if len(steps) == MAX_STEPS:
                break
    return steps


def _equation(line: str) -> str:
    """The arithmetic around the "=" signs of a line: the run of arithmetic characters before the
    first "=" and after the last one (scanned in linear time), unbalanced outer parentheses dropped."""
    parts = line.split("=")
    head, tail = parts[0], parts[-1]
    i = len(head)
    while i > 0 and head[i - 1] in _ARITH_CHARS:
        i -= 1
    j = 0
    while j < len(tail) and tail[j] in _ARITH_CHARS:
        j += 1
    first, last = head[i:].strip(), tail[:j].strip().rstrip(".").strip()
    while first.startswith("(") and first.count("(") > first.count(")"):
        first = first[1:].lstrip()
    while last.endswith(")") and last.count(")") > last.count("("):
        last = last[:-1].rstrip()
    return " = ".join([first, *(p.strip() for p in parts[1:-1]), last])


def _value(side: str) -> Fraction | None:
    if not side or len(side) > MAX_EXPR_CHARS:
        return None
    number = parse_number(side)
    if number is not None:
        return number
    try:
        return safe_arith(side)
    except ValueError:
        return None


def _literals(side: str) -> list[Fraction]:
    """The numbers written in a side (at most MAX_EXPR_CHARS characters are read)."""
    return [Fraction(x) for x in _LITERAL.findall(side[:MAX_EXPR_CHARS])]


def check_steps(text: str, numbers: Iterable[int | Fraction]) -> StepReport:
    """Check every step of `text` for a problem whose given numbers are `numbers`."""
    known = {Fraction(n) for n in numbers}
    checks = []
    for equation in split_steps(text):
        sides = equation.split(" = ") if equation.count("=") < MAX_SIDES else [equation]
        values = [_value(side) for side in sides]
        arithmetic_ok = len(sides) >= 2 and None not in values and len(set(values)) == 1
        grounded = len(sides) >= 2 and len(sides[0]) <= MAX_EXPR_CHARS and all(n in known for n in _literals(sides[0]))
        checks.append(StepCheck(equation, arithmetic_ok, grounded, values[-1]))
        for side, value in zip(sides, values):  # what later steps may use: every number written here
            known.update(_literals(side))
            if value is not None:
                known.add(value)
    first = next((i for i, c in enumerate(checks) if not c.ok), None)
    return StepReport(tuple(checks), first)

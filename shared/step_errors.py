r"""Planted step errors and a step-error benchmark for step verifiers (critics, PRMs) on `multistep`.

A `multistep` problem's reference solution is a list of steps "a op b = c" (`meta["steps"]`). This
module plants a first error at a known position and scores a verifier's step verdicts:

    plant_error       rewrite one reference step into a wrong one of a given type:
                      calculation error  c off by 1, 2 or 10                (check_steps: arithmetic)
                      misread number     an operand moved by 1 or 2 to a number that is neither in the
                                         problem nor in an earlier step, result recomputed (ungrounded)
                      wrong operation    another operator, result recomputed: arithmetic and grounded,
                                         but not what the problem asks (check_steps cannot see it)
    planted_solutions ProcessBench-style solutions: half keep their reference steps (no error), half get
                      a planted first error at a random position after a correct prefix; from a seed
    own_solutions     a model's own wrong solutions, the first wrong step located by `check_steps`
    processbench_solutions  Qwen/ProcessBench by name (needs the Hub or its cache)
    benchmark_metrics step-level accuracies (SPC's ProcessBench number) and ProcessBench's F1

A solution keeps its steps up to and including the first error: later steps are never judged.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction

from shared.steps import check_steps

ERROR_TYPES = ("calculation error", "misread number", "wrong operation")
_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def problem_text(p) -> str:
    """The problem as a verifier reads it: "Compute 3 + 8 + 5." for the built-in tasks, else the prompt."""
    return f"Compute {p.meta['expression']}." if "expression" in p.meta else p.prompt


def _apply(a: int, op: str, b: int) -> Fraction | None:
    if op == "/" and b == 0:
        return None
    return {"+": Fraction(a + b), "-": Fraction(a - b), "*": Fraction(a * b), "/": Fraction(a, b or 1)}[op]


def plant_error(step: str, known: set, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """Rewrite a reference step "a op b = c" into a wrong one of `kind`: (new step, what changed), or None.
    calculation error: c off by 1, 2 or 10 (check_steps: arithmetic); misread number: an operand moved by
    1 or 2 to a number not in `known`, result recomputed (check_steps: ungrounded); wrong operation:
    another operator, result recomputed (arithmetic and grounded, but not what the problem asks)."""
    a, op, b, c = _EQ.fullmatch(step).groups()
    a, b, c = int(a), int(b), int(c)
    if kind == "calculation error":
        options = [(f"{a} {op} {b} = {c + d}", f"give {c + d} as the result") for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0]
    elif kind == "misread number":
        options = []
        for side, x in ((0, a), (1, b)):
            for d in (-2, -1, 1, 2):
                y = x + d
                v = _apply(y, op, b) if side == 0 else _apply(a, op, y)
                if y >= 1 and Fraction(y) not in known and v is not None and v.denominator == 1 and 0 <= v != c:
                    options.append((f"{y if side == 0 else a} {op} {b if side == 0 else y} = {v}", f"use {y} instead of {x}"))
    else:
        options = [(f"{a} {o} {b} = {v}", f"use {o} instead of {op}") for o in "+-*"
                   if o != op and (v := _apply(a, o, b)) is not None and 0 <= v != c]
    return rng.choice(options) if options else None


def plant_any(step: str, known: set, rng: random.Random) -> tuple[str, int, str]:
    """(wrong step, error type index, what changed) of a random applicable type (calculation always is)."""
    for t in rng.sample(range(len(ERROR_TYPES)), len(ERROR_TYPES)):
        if planted := plant_error(step, known, ERROR_TYPES[t], rng):
            return planted[0], t, planted[1]
    raise ValueError(f"no error can be planted in {step!r}")


def known_numbers(problem, prefix: list[str]) -> set:
    """The numbers of the problem and of the earlier steps (what check_steps calls grounded)."""
    return {Fraction(n) for n in problem.meta["numbers"]} | {Fraction(x) for s in prefix for x in re.findall(r"\d+", s)}



# ------------------------------------------------------------------------------------ the step-error benchmark
@dataclass
class Solution:
    """A solution for the benchmark: steps up to (and including) its first error, or all of them."""
    problem: str
    steps: list[str]
    first_error: int  # −1: every step is correct
    source: str  # reference, planted, own, processbench


def planted_solutions(problems, seed: int) -> list[Solution]:
    """Half the problems keep their reference solution (no error); the other half get a planted first
    error at a random position k, after a correct prefix. Deterministic from the seed."""
    rng, out = random.Random(f"spc/benchmark/{seed}"), []
    for p in problems:
        steps = p.meta["steps"]
        if rng.random() < 0.5:
            out.append(Solution(problem_text(p), list(steps), -1, "reference"))
            continue
        k = rng.randrange(len(steps))
        wrong, _, _ = plant_any(steps[k], known_numbers(p, steps[:k]), rng)
        out.append(Solution(problem_text(p), steps[:k] + [wrong], k, "planted"))
    return out


def own_solutions(problems, texts: list[str], verify) -> tuple[list[Solution], int]:
    """The model's own wrong solutions whose first wrong step `check_steps` locates, cut after it; kept
    only if every earlier step's value is a value of the reference solution (no unflagged detours).
    Returns (solutions, wrong answers whose error could not be located)."""
    out, unlocated = [], 0
    for p, text in zip(problems, texts):
        if verify(text, p):
            continue
        report = check_steps(text, p.meta["numbers"])
        values = {Fraction(s.split(" = ")[-1]) for s in p.meta["steps"]}
        e = report.first_error
        if e is None or any(c.value not in values for c in report.steps[:e]):
            unlocated += 1
            continue
        out.append(Solution(problem_text(p), [c.text for c in report.steps[:e + 1]], e, "own"))
    return out, unlocated


def processbench_solutions(subset: str) -> list[Solution]:
    """Qwen/ProcessBench (problem, steps, label = first error index or −1), cut after the first error."""
    from shared.tasks import _load_hub_dataset

    rows = _load_hub_dataset("processbench", "Qwen/ProcessBench")[subset]
    return [Solution(r["problem"], list(r["steps"][:r["label"] + 1] if r["label"] >= 0 else r["steps"]), r["label"],
                     "processbench") for r in rows]


def benchmark_metrics(solutions: list[Solution], verdicts: list[list[int]]) -> dict[str, float]:
    """verdicts[i][j]: the critic on step j of solution i (+1, −1, 0 invalid).
    Step level (SPC's ProcessBench number): accuracy on correct steps and on first-error steps, invalid
    verdicts excluded (as eval/infer_batch.py), their average and harmonic mean. Solution level
    (ProcessBench): the predicted first error is the first step judged Incorrect (invalid = not flagged);
    first_error_acc on erroneous solutions, no_error_acc on correct ones, F1 their harmonic mean."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    def hmean(a, b):
        return 2 * a * b / (a + b) if a + b > 0 else (0.0 if a == a and b == b else float("nan"))

    on_correct, on_error, first_ok, none_ok, by_source = [], [], [], [], {}
    for s, v in zip(solutions, verdicts):
        for j, verdict in enumerate(v):
            (on_error if j == s.first_error else on_correct).append(verdict)
        predicted = next((j for j, verdict in enumerate(v) if verdict == -1), -1)
        if s.first_error >= 0:
            first_ok.append(predicted == s.first_error)
            by_source.setdefault(s.source, []).append(v[s.first_error])
        else:
            none_ok.append(predicted == -1)
    acc_c = mean([x == 1 for x in on_correct if x])
    acc_e = mean([x == -1 for x in on_error if x])
    first, none_ = mean(first_ok), mean(none_ok)
    out = {"acc_correct_step": acc_c, "acc_error_step": acc_e, "accuracy": (acc_c + acc_e) / 2,
           "harmonic": hmean(acc_c, acc_e), "first_error_acc": first, "no_error_acc": none_, "f1": hmean(first, none_),
           "valid_rate": mean([x != 0 for x in on_correct + on_error]), "steps": len(on_correct) + len(on_error)}
    return out | {f"acc_error_{k}": mean([x == -1 for x in xs if x]) for k, xs in by_source.items()}


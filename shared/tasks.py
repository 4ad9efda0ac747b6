"""Tasks: problems with gold answers plus a verifier, all returned by `load_task(name, ...)`.

Built-in tasks run offline and are generated from a seed:
  arith      mental arithmetic at five levels (see ARITH_LEVELS); the answer is the last number
  multistep  the same kind of expressions, solved step by step: the reference solution is a list
             of steps, each one operation written as an equation ("17 + 25 = 42"), and
             `shared.steps.check_steps` grades a model's steps exactly (see MULTISTEP_LEVELS)
  countdown  reach a target with + - * / using each given number once (always solvable)
Hugging Face adapters (need the Hub, or a local cache with HF_HUB_OFFLINE=1):
  gsm8k         openai/gsm8k "main"; gold after "####"; the "Answer:" line, else the last number
  math500       HuggingFaceH4/MATH-500; \\boxed{} verification
  countdown-hf  Jiayi-Pan/Countdown-Tasks-3to4 (nums, target); Countdown verification

How the built-in splits are made
--------------------------------
Every problem has a canonical key (commutative operands sorted, so "23 + 45" and "45 + 23" share a
key). A stable hash of the key (sha256, not Python's per-process salted `hash()`) sends it to
"test" with probability TEST_FRACTION, to "dev" with probability DEV_FRACTION and to "train"
otherwise. The three splits therefore cannot overlap, even up to commutativity. Dev is for model
selection and early stopping; test is only reported. Problems are drawn from a random stream and kept when the key
falls in the wanted split. Small problem spaces (arith levels 1-2) are enumerated and shuffled
instead, so a request for more problems than exist fails with an exact count rather than looping.
  - train depends on (name, level, seed, n_train): a new seed gives a new order and new problems.
  - test depends only on (name, level, n_test), so every run, whatever its seed, is evaluated on
    the same held-out problems. A smaller n_test gives a prefix of a larger one. Dev likewise
    depends only on (name, level, n_dev).
  - Keys ignore the level, so an arith test problem stays held out at every level that can
    generate it (level 2 never trains on level 1's test set). multistep shares arith's keys: an
    expression held out of one is held out of the other.
"""

from __future__ import annotations

import hashlib
import operator
import os
import random
import socket
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable

from shared.verifiers import Verdict, verify_countdown, verify_math

TASKS = ("arith", "multistep", "countdown", "gsm8k", "math500", "countdown-hf")
TEST_FRACTION = 0.1  # share of canonical keys reserved for the test split
DEV_FRACTION = 0.1  # share reserved for the dev split (model selection, early stopping)

# User messages. Kept short and literal for small instruct models (SmolLM2-135M-Instruct).
ARITH_PROMPT = "What is {expression}? Give only the final number."
COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, write an equation that equals {target}. "
    "Use each number exactly once, with + - * / and parentheses. "
    'Write the equation on the last line after "Answer:", for example: Answer: (1 + 2) * 3'
)
MULTISTEP_PROMPT = ('Solve {expression} step by step. Write one calculation per line, then end with '
                    '"Answer: <number>".')
GSM8K_PROMPT = ('{question}\nSolve it step by step, then give the final number on the last line '
                'as "Answer: <number>".')
MATH_PROMPT = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."

ARITH_LEVELS = {
    1: "2-digit + 2-digit addition",
    2: "2-digit addition or subtraction (never below zero)",
    3: "3-digit addition/subtraction (never below zero), or 1-digit x 2-digit multiplication",
    4: "two mixed operations on numbers 2..20, e.g. (12 + 7) * 3",
    5: "three mixed operations on numbers 2..20, with parentheses",
}
MULTISTEP_LEVELS = {  # level -> (operations, operators, smallest and largest number)
    1: (2, "+-", 1, 9),  # 7 - 5 + 8: two steps on one-digit numbers, never below zero
    2: (2, "+-", 2, 20),
    3: (2, "+-*", 2, 12),
    4: (3, "+-*/", 2, 20),  # the expressions of arith level 5, with parentheses
}
COUNTDOWN_LEVELS = {1: 3, 2: 4}  # level -> how many numbers
COUNTDOWN_NUMBERS = (1, 99)  # range of the given numbers
COUNTDOWN_TARGETS = (1, 100)  # range of the targets


@dataclass
class Problem:
    prompt: str  # the user message (plain text; the algorithm applies the chat template)
    answer: str  # gold answer as a string ("68"; for countdown the target)
    meta: dict = field(default_factory=dict)  # {"level": 1, ...}; countdown adds numbers, target


@dataclass
class Task:
    name: str
    train: list[Problem]
    test: list[Problem]
    system_prompt: str | None
    mode: str = "last_number"  # verification: "last_number", "boxed", "answer", "answer_or_last_number" or "countdown"
    dev: list[Problem] = field(default_factory=list)  # for selection and early stopping, disjoint from both

    def verify(self, completion: str, problem: Problem) -> Verdict:
        if self.mode == "countdown":
            return verify_countdown(completion, problem.meta["numbers"], problem.meta["target"])
        return verify_math(completion, problem.answer, self.mode)

    def reward(self, completion: str, problem: Problem) -> float:
        """1.0 if the completion is correct, else 0.0."""
        return 1.0 if self.verify(completion, problem).correct else 0.0


def load_task(name: str, seed: int = 0, n_train: int = 2000, n_test: int = 200,
              level: int = 1, n_dev: int = 0) -> Task:
    """Build a task. Built-in tasks return exactly n_train/n_test problems (ValueError if that
    many distinct ones do not exist). Hub datasets are fixed in size: they return at most
    n_train/n_test. `level` applies to arith (1-5) and countdown (1-2)."""
    if not all(isinstance(n, int) and n >= 0 for n in (n_train, n_test, n_dev)):
        raise ValueError(f"n_train, n_test and n_dev must be non-negative ints, got {n_train}, {n_test}, {n_dev}")
    if name == "arith":
        return _arith_task(seed, n_train, n_test, level, n_dev)
    if name == "multistep":
        return _multistep_task(seed, n_train, n_test, level, n_dev)
    if name == "countdown":
        return _countdown_task(seed, n_train, n_test, level, n_dev)
    if name in _HF_LOADERS:
        return _HF_LOADERS[name](seed, n_train, n_test, n_dev)
    raise SystemExit(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")


def task_levels(name: str) -> set[int] | None:
    """The levels a built-in task has (None for a task without levels)."""
    return {"arith": set(ARITH_LEVELS), "multistep": set(MULTISTEP_LEVELS),
            "countdown": set(COUNTDOWN_LEVELS)}.get(name)


# ----------------------------------------------------------------------------------------------
# Expression trees shared by arith and countdown: an int, or (op, left, right).
# ----------------------------------------------------------------------------------------------
Expr = int | tuple  # an int leaf, or (op, left, right)
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _render(e: Expr, top: bool = True) -> str:
    """'(12 + 7) * 3': every operation except the outermost is parenthesized."""
    if isinstance(e, int):
        return str(e)
    op, left, right = e
    text = f"{_render(left, False)} {op} {_render(right, False)}"
    return text if top else f"({text})"


def _canonical(e: Expr) -> str:
    """Key that is the same for a + b and b + a (and a * b, b * a), at every depth."""
    if isinstance(e, int):
        return str(e)
    op, left, right = e
    a, b = _canonical(left), _canonical(right)
    if op in "+*":
        a, b = sorted((a, b))
    return f"({a}{op}{b})"


def _value(e: Expr) -> Fraction | None:
    """Exact value, or None unless every intermediate result is an integer (exact division)."""
    if isinstance(e, int):
        return Fraction(e)
    op, left, right = e
    a, b = _value(left), _value(right)
    if a is None or b is None or (op == "/" and b == 0):
        return None
    v = _OPS[op](a, b)
    return v if v.denominator == 1 else None


def _ops(e: Expr) -> list[str]:
    return [] if isinstance(e, int) else _ops(e[1]) + [e[0]] + _ops(e[2])


def _random_tree(rng: random.Random, leaves: list[int], ops: str) -> Expr:
    """A random binary tree over `leaves` (kept in order) with random operators."""
    if len(leaves) == 1:
        return leaves[0]
    k = rng.randint(1, len(leaves) - 1)
    return (rng.choice(ops), _random_tree(rng, leaves[:k], ops), _random_tree(rng, leaves[k:], ops))


# ----------------------------------------------------------------------------------------------
# Splitting and drawing
# ----------------------------------------------------------------------------------------------


def _split_of(key: str) -> str:
    """'test' or 'train', fixed forever by a hash of the canonical key."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    u = h / 2**64
    return "test" if u < TEST_FRACTION else "dev" if u < TEST_FRACTION + DEV_FRACTION else "train"


def _draw(split: str, n: int, rng: random.Random, what: str, key: Callable, uid: Callable,
          sample: Callable | None = None, space: Iterable | None = None) -> list:
    """n distinct items of `split` (distinct by uid), from an enumerated `space` (shuffled) or
    by rejection sampling from `sample(rng)`."""
    if space is not None:
        pool = [x for x in space if _split_of(key(x)) == split]
        if n > len(pool):
            raise ValueError(
                f"{what} has only {len(pool)} distinct {split} problems (a fixed hash sends "
                f"{TEST_FRACTION:.0%} of problems to test and {DEV_FRACTION:.0%} to dev); asked for {n}. "
                "Ask for fewer or use a higher level.")
        rng.shuffle(pool)
        return pool[:n]
    out, seen = [], set()
    for _ in range(100 * n + 10_000):
        if len(out) == n:
            break
        x = sample(rng)
        if _split_of(key(x)) == split and uid(x) not in seen:
            seen.add(uid(x))
            out.append(x)
    if len(out) < n:
        raise ValueError(f"could only generate {len(out)} distinct {split} problems for {what}; "
                         f"asked for {n}")
    return out


def _splits(name: str, level: int, seed: int, n_train: int, n_test: int, n_dev: int, **draw_kwargs):
    """(train, test, dev) problems; test and dev do not depend on the seed."""
    what = f"{name} level {level}"
    test_rng = random.Random(f"{name}/level{level}/test")  # str seeds are hashed deterministically
    dev_rng = random.Random(f"{name}/level{level}/dev")
    train_rng = random.Random(f"{name}/level{level}/train/seed{seed}")
    return (_draw("train", n_train, train_rng, what, **draw_kwargs),
            _draw("test", n_test, test_rng, what, **draw_kwargs),
            _draw("dev", n_dev, dev_rng, what, **draw_kwargs))


# ----------------------------------------------------------------------------------------------
# arith
# ----------------------------------------------------------------------------------------------


def _arith_space(level: int) -> list[Expr] | None:
    """Every problem of a level, when there are few enough to list (levels 1 and 2)."""
    two_digit = range(10, 100)
    if level == 1:
        return [("+", a, b) for a in two_digit for b in two_digit]
    if level == 2:
        return ([("+", a, b) for a in two_digit for b in two_digit]
                + [("-", a, b) for a in two_digit for b in two_digit if a >= b])
    return None


def _arith_sample(rng: random.Random, level: int) -> Expr:
    if level == 3:
        op = rng.choice("+-*")
        if op == "*":
            pair = [rng.randint(2, 9), rng.randint(10, 99)]
            rng.shuffle(pair)
            return ("*", *pair)
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return (op, a, b) if op == "+" else ("-", max(a, b), min(a, b))
    n_ops = {4: 2, 5: 3}[level]
    while True:  # redraw inexact divisions, single-operation trees and answers over 1000
        tree = _random_tree(rng, [rng.randint(2, 20) for _ in range(n_ops + 1)], "+-*/")
        ops = _ops(tree)
        value = _value(tree)
        if len(set(ops)) >= 2 and value is not None and abs(value) <= 1000:
            return tree


def _arith_problem(tree: Expr, level: int) -> Problem:
    expression = _render(tree)
    return Problem(prompt=ARITH_PROMPT.format(expression=expression), answer=str(_value(tree)),
                   meta={"level": level, "expression": expression, "ops": _ops(tree)})


def _expression_task(name: str, levels: dict, sample: Callable, space: Callable, problem: Callable,
                     seed: int, n_train: int, n_test: int, level: int, n_dev: int) -> Task:
    """arith and multistep: expression trees split by arith's keys, graded by the last number."""
    if level not in levels:
        raise ValueError(f"{name} level must be one of {sorted(levels)}, got {level}")
    train, test, dev = _splits(name, level, seed, n_train, n_test, n_dev, key=lambda t: "arith:" + _canonical(t),
                               uid=_render, sample=lambda rng: sample(rng, level), space=space(level))
    return Task(name=name, train=[problem(t, level) for t in train], test=[problem(t, level) for t in test],
                system_prompt=None, mode="last_number", dev=[problem(t, level) for t in dev])


def _arith_task(seed: int, n_train: int, n_test: int, level: int, n_dev: int = 0) -> Task:
    return _expression_task("arith", ARITH_LEVELS, _arith_sample, _arith_space, _arith_problem,
                            seed, n_train, n_test, level, n_dev)


# ----------------------------------------------------------------------------------------------
# multistep
# ----------------------------------------------------------------------------------------------


def _render_steps_expression(e: Expr) -> str:
    """A left-to-right chain of + and − reads without parentheses ("7 - 5 + 8"); anything else is
    rendered with every inner operation parenthesised ("(12 + 7) * 3")."""
    def chain(t: Expr) -> bool:
        return isinstance(t, int) or (t[0] in "+-" and chain(t[1]) and isinstance(t[2], int))
    return " ".join(_render(e).replace("(", "").replace(")", "").split()) if chain(e) else _render(e)


def solution_steps(e: Expr) -> list[str]:
    """The reference solution: one equation per operation, inner operations first, left to right
    ("12 + 7 = 19", "19 * 3 = 57"). Each step uses numbers of the problem or results of earlier steps."""
    steps: list[str] = []

    def walk(t: Expr) -> Fraction:
        if isinstance(t, int):
            return Fraction(t)
        op, left, right = t
        a, b = walk(left), walk(right)
        value = _OPS[op](a, b)
        steps.append(f"{a} {op} {b} = {value}")
        return value

    walk(e)
    return steps


def _multistep_sample(rng: random.Random, level: int) -> Expr:
    n_ops, ops, lo, hi = MULTISTEP_LEVELS[level]
    while True:  # redraw negative or inexact intermediate results and answers over 1000
        leaves = [rng.randint(lo, hi) for _ in range(n_ops + 1)]
        tree = _random_tree(rng, leaves, ops) if n_ops > 2 or "*" in ops else _left_chain(rng, leaves, ops)
        steps_ok = all(v is not None and v >= 0 for v in map(_value, _subtrees(tree)))
        if steps_ok and abs(_value(tree)) <= 1000 and (n_ops < 3 or len(set(_ops(tree))) >= 2):
            return tree


def _left_chain(rng: random.Random, leaves: list[int], ops: str) -> Expr:
    tree: Expr = leaves[0]
    for leaf in leaves[1:]:
        tree = (rng.choice(ops), tree, leaf)
    return tree


def _subtrees(e: Expr) -> list[Expr]:
    return [] if isinstance(e, int) else _subtrees(e[1]) + _subtrees(e[2]) + [e]


def _multistep_space(level: int) -> list[Expr] | None:
    """Level 1 is small enough to list: a ± b ± c on one-digit numbers."""
    if level != 1:
        return None
    _, ops, lo, hi = MULTISTEP_LEVELS[1]
    digits = range(lo, hi + 1)
    trees = [(o2, (o1, a, b), c) for a in digits for b in digits for c in digits for o1 in ops for o2 in ops]
    return [t for t in trees if all(_value(s) >= 0 for s in _subtrees(t))]


def _multistep_problem(tree: Expr, level: int) -> Problem:
    expression = _render_steps_expression(tree)
    steps = solution_steps(tree)
    numbers = [leaf for leaf in _leaves(tree)]
    return Problem(prompt=MULTISTEP_PROMPT.format(expression=expression), answer=str(_value(tree)),
                   meta={"level": level, "expression": expression, "ops": _ops(tree), "steps": steps,
                         "numbers": numbers, "solution": "\n".join(steps + [f"Answer: {_value(tree)}"])})


def _leaves(e: Expr) -> list[int]:
    return [e] if isinstance(e, int) else _leaves(e[1]) + _leaves(e[2])


def _multistep_task(seed: int, n_train: int, n_test: int, level: int, n_dev: int = 0) -> Task:
    return _expression_task("multistep", MULTISTEP_LEVELS, _multistep_sample, _multistep_space, _multistep_problem,
                            seed, n_train, n_test, level, n_dev)


# ----------------------------------------------------------------------------------------------
# countdown
# ----------------------------------------------------------------------------------------------


def _countdown_key(numbers: list[int], target: int) -> str:
    return f"countdown:{','.join(map(str, sorted(numbers)))}->{target}"


def _countdown_tree(rng: random.Random, leaves: list[int]) -> tuple[Expr, int]:
    """A random tree over `leaves` whose every step stays a positive integer (Countdown rules:
    '-' only when the left side is larger, '/' only when it divides exactly), and its value."""
    if len(leaves) == 1:
        return leaves[0], leaves[0]
    k = rng.randint(1, len(leaves) - 1)
    (left, a), (right, b) = _countdown_tree(rng, leaves[:k]), _countdown_tree(rng, leaves[k:])
    op = rng.choice("+*" + "-" * (a > b) + "/" * (a % b == 0))
    return (op, left, right), {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _countdown_sample(rng: random.Random, level: int) -> tuple[list[int], Expr, int]:
    """(numbers as shown, a solution, target). The target is the value of a random expression
    over the numbers, so a solution always exists."""
    while True:  # about one draw in ten has a target in range
        numbers = [rng.randint(*COUNTDOWN_NUMBERS) for _ in range(COUNTDOWN_LEVELS[level])]
        solution, target = _countdown_tree(rng, rng.sample(numbers, len(numbers)))
        if COUNTDOWN_TARGETS[0] <= target <= COUNTDOWN_TARGETS[1]:
            return numbers, solution, target


def _countdown_problem(numbers: list[int], target: int, **meta) -> Problem:
    numbers, target = [int(n) for n in numbers], int(target)
    return Problem(prompt=COUNTDOWN_PROMPT.format(numbers=numbers, target=target),
                   answer=str(target), meta={"numbers": numbers, "target": target, **meta})


def _countdown_task(seed: int, n_train: int, n_test: int, level: int, n_dev: int = 0) -> Task:
    if level not in COUNTDOWN_LEVELS:
        raise ValueError(f"countdown level must be one of {sorted(COUNTDOWN_LEVELS)}, got {level}")

    def key(x):  # x = (numbers, solution, target); the same numbers and target are one problem
        return _countdown_key(x[0], x[2])

    def make(x):
        return _countdown_problem(x[0], x[2], level=level, solution=_render(x[1]))

    train, test, dev = _splits("countdown", level, seed, n_train, n_test, n_dev, key=key, uid=key,
                               sample=lambda rng: _countdown_sample(rng, level))
    return Task(name="countdown", train=[make(x) for x in train], test=[make(x) for x in test],
                system_prompt=None, mode="countdown", dev=[make(x) for x in dev])


# ----------------------------------------------------------------------------------------------
# Hugging Face adapters. `datasets` is imported only here, and only when one is asked for.
# ----------------------------------------------------------------------------------------------
_OFFLINE_HINT = "use --task arith or --task countdown (built-in, offline)"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub? Checked up front because `datasets` retries an
    unreachable Hub for ~25 s before failing. Behind a proxy we cannot tell, so we say yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _load_hub_dataset(task: str, path: str, config: str | None = None):
    """The DatasetDict for `path`, from the Hub or the local cache; else exit with one line."""
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE")
    if not offline and not _hub_reachable():
        raise SystemExit(f"{task}: cannot download {path}: the Hugging Face Hub is unreachable; "
                         f"{_OFFLINE_HINT}, or set HF_HUB_OFFLINE=1 if it is in the local cache.")
    import datasets

    try:
        return datasets.load_dataset(path, config)
    except OSError as e:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, HTTP errors
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise SystemExit(f"{task}: cannot load {path}: the Hugging Face Hub is unreachable or "
                         f"offline and it is not cached ({type(e).__name__}: {reason}); "
                         f"{_OFFLINE_HINT}.") from None


def _gsm8k_problem(row: dict) -> Problem:
    gold = row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    return Problem(prompt=GSM8K_PROMPT.format(question=row["question"].strip()), answer=gold,
                   meta={"solution": row["answer"]})


def _math500_problem(row: dict) -> Problem:
    return Problem(prompt=MATH_PROMPT.format(problem=row["problem"].strip()), answer=row["answer"],
                   meta={k: row.get(k) for k in ("level", "subject", "unique_id")})


def _shuffled(n_rows: int, seed: int, salt: str) -> list[int]:
    order = list(range(n_rows))
    random.Random(f"{salt}/seed{seed}").shuffle(order)
    return order


def _gsm8k_task(seed: int, n_train: int, n_test: int, n_dev: int = 0) -> Task:
    """Test: the first n_test rows of GSM8K's test split. Dev: n_dev rows of its train split chosen
    by a fixed shuffle (the same for every seed); train: the other train rows in seeded order."""
    ds = _load_hub_dataset("gsm8k", "openai/gsm8k", "main")
    dev_rows = _shuffled(len(ds["train"]), 0, "gsm8k-dev")[:n_dev]
    held = set(dev_rows)
    order = [i for i in _shuffled(len(ds["train"]), seed, "gsm8k") if i not in held][:n_train]
    train = [_gsm8k_problem(ds["train"][i]) for i in order]
    test = [_gsm8k_problem(ds["test"][i]) for i in range(min(n_test, len(ds["test"])))]
    return Task(name="gsm8k", train=train, test=test, system_prompt=None, mode="answer_or_last_number",
                dev=[_gsm8k_problem(ds["train"][i]) for i in dev_rows])


def _math500_task(seed: int, n_train: int, n_test: int, n_dev: int = 0) -> Task:
    """MATH-500 is one 500-problem test split: test is its first n_test rows, dev the next n_dev,
    train is drawn from the remaining rows (meant for smoke runs, not for claims about MATH-500)."""
    rows = _load_hub_dataset("math500", "HuggingFaceH4/MATH-500")["test"]
    n_test = min(n_test, len(rows))
    n_dev = min(n_dev, len(rows) - n_test)
    held = n_test + n_dev
    rest = [held + i for i in _shuffled(len(rows) - held, seed, "math500")][:n_train]
    return Task(name="math500", train=[_math500_problem(rows[i]) for i in rest],
                test=[_math500_problem(rows[i]) for i in range(n_test)], system_prompt=None,
                mode="boxed", dev=[_math500_problem(rows[i]) for i in range(n_test, held)])


def _countdown_hf_task(seed: int, n_train: int, n_test: int, n_dev: int = 0) -> Task:
    """The dataset has a single split; it is divided with the same key hash as the built-in
    countdown (test and dev: first matching rows in stored order; train: seeded order)."""
    rows = _load_hub_dataset("countdown-hf", "Jiayi-Pan/Countdown-Tasks-3to4")["train"]

    def take(split: str, n: int, order: Iterable[int]) -> list[Problem]:
        out = []
        for i in order:
            if len(out) == n:
                break
            row = rows[i]
            if _split_of(_countdown_key(row["nums"], row["target"])) == split:
                out.append(_countdown_problem(row["nums"], row["target"]))
        return out

    return Task(name="countdown-hf", train=take("train", n_train, _shuffled(len(rows), seed, "cd")),
                test=take("test", n_test, range(len(rows))), system_prompt=None, mode="countdown",
                dev=take("dev", n_dev, range(len(rows))))


_HF_LOADERS = {"gsm8k": _gsm8k_task, "math500": _math500_task, "countdown-hf": _countdown_hf_task}

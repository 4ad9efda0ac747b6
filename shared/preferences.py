"""Preference data (x, y_w, y_l): y_w is preferred to y_l as an answer to x.

Two sources, one shape (`Triple`):

- `builtin_triples(task, problems, seed)`: made offline from a built-in task. y_w is the task's
  reference answer, correct and well-formed (for `multistep` the solution one calculation per line,
  then "Answer: n"; for `arith` the bare number its prompt asks for). y_l is a worse answer made from
  it by a rule: a wrong step carried through to a wrong answer, right steps with a wrong final line,
  or rambling prose without the steps (right or wrong final number). Every triple is checked with
  `quality`, the exact grade that defines the preference: 2 = correct and well-formed, 1 = correct
  final answer but not well-formed, 0 = wrong (a truncated answer is wrong).
- `hub_triples(name, split, n, seed)`: Anthropic/hh-rlhf (the dialogue up to the last assistant turn
  is x; the two last turns are y_w and y_l) or the TL;DR comparisons of OpenAI's
  summarize_from_feedback (the post is x; the chosen summary y_w). They need the Hugging Face Hub or
  a local cache and otherwise exit with one line.

`reward_model_judge(name)` loads a standard reward model R(x, y) from the Hub as an independent judge of
answers where no verifier exists. Plumbing only: nothing here trains a model.
"""

from __future__ import annotations

import random
import re

import torch
from dataclasses import dataclass
from fractions import Fraction

from shared.steps import check_steps
from shared.tasks import _OFFLINE_HINT, Problem, Task, _load_hub_dataset

HUB_PREFERENCES = {"hh-rlhf": ("Anthropic/hh-rlhf", None), "tldr": ("openai/summarize_from_feedback", "comparisons")}
MULTISTEP_KINDS = ("wrong_step", "wrong_answer", "rambling", "wrong_rambling")
ARITH_KINDS = ("wrong", "rambling", "wrong_rambling")


@dataclass(frozen=True)
class Triple:
    x: str  # the user message (plain text; the algorithm applies its template)
    y_w: str  # the preferred answer
    y_l: str  # the worse answer
    problem: Problem | None = None  # the task problem behind x (built-in data), for exact grading
    kind: str = "human"  # how y_l was made (built-in) or "human" (a labelled comparison)


# ------------------------------------------------------------------------------------ grading
def quality(task: Task, problem: Problem, text: str, truncated: bool = False) -> int:
    """2: correct and well-formed (multistep: every step right and grounded, at least one; arith: the
    number alone), 1: correct final answer but not well-formed, 0: wrong or truncated."""
    if truncated or not task.verify(text, problem).correct:
        return 0
    if task.name == "multistep":
        return 2 if check_steps(text, problem.meta["numbers"]).all_ok else 1
    return 2 if text.strip() == problem.answer else 1


# ------------------------------------------------------------------------------------ built-in set
_STEP = re.compile(r"^(-?[0-9]+) ([-+*/]) (-?[0-9]+) = (-?[0-9]+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
        "/": lambda a, b: a / b if b else None}
RAMBLING = (  # prose without the calculations; {value} is the final number it states
    "To work out {expression} I need to think about it carefully. The numbers are {numbers}. "
    "If I put them all together in my head, I get {value}. So the answer is {value}.",
    "Let me see. {expression} is a calculation with the numbers {numbers}, and doing it step by "
    "step is a lot of work, so I will just estimate it. It comes to about {value}.",
    "Sure! This is a simple math problem. We start with {numbers} and combine them as the "
    "expression {expression} says. After combining everything, the result is {value}.",
)


def _offset(rng: random.Random, value: Fraction, floor: Fraction | None = Fraction(0)) -> Fraction:
    """A nearby wrong value: value ± 1..10 (never below `floor`)."""
    while True:
        wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
        if wrong != value and (floor is None or wrong >= floor):
            return wrong


def wrong_step_solution(steps: list[str], rng: random.Random) -> list[str] | None:
    """The solution with one step's result off by a little and every later step recomputed from it
    (a later operand that equals the old result is read as that result), so the error carries
    through to the final answer. None when a step cannot be parsed or the error vanishes."""
    parsed = [_STEP.match(s) for s in steps]
    if not steps or any(m is None for m in parsed):
        return None
    rows = [[Fraction(m.group(1)), m.group(2), Fraction(m.group(3)), Fraction(m.group(4))] for m in parsed]
    i = rng.randrange(len(rows))
    changed = {rows[i][3]: _offset(rng, rows[i][3])}  # result as written -> result carried on
    rows[i][3] = changed[rows[i][3]]
    for row in rows[i + 1:]:
        for side in (0, 2):
            if row[side] in changed:
                row[side] = changed[row[side]]
                break
        value = _OPS[row[1]](row[0], row[2])
        if value is None or value.denominator != 1 or value < 0:
            return None
        if value != row[3]:
            changed[row[3]] = value
        row[3] = value
    if rows[-1][3] == Fraction(parsed[-1].group(4)):
        return None
    return [f"{a} {op} {b} = {v}" for a, op, b, v in rows]


def corrupt(problem: Problem, task_name: str, kind: str, rng: random.Random) -> str:
    """A worse answer of the given kind, made from the problem's reference answer."""
    answer = Fraction(problem.answer)
    numbers = ", ".join(map(str, problem.meta.get("numbers", []))) or problem.meta["expression"]
    prose = rng.choice(RAMBLING)
    if kind in ("rambling", "wrong_rambling"):
        value = answer if kind == "rambling" else _offset(rng, answer, Fraction(0) if answer >= 0 else None)
        return prose.format(expression=problem.meta["expression"], numbers=numbers, value=value)
    if task_name == "arith":  # kind == "wrong"
        return str(_offset(rng, answer, None))
    steps = problem.meta["steps"]
    if kind == "wrong_step":
        wrong = wrong_step_solution(steps, rng)
        if wrong is not None:
            return "\n".join(wrong + [f"Answer: {wrong[-1].rsplit('= ', 1)[1]}"])
    return "\n".join(steps + [f"Answer: {_offset(rng, answer, Fraction(0) if answer >= 0 else None)}"])  # wrong_answer (or the fallback)


def builtin_triples(task: Task, problems: list[Problem], seed: int, kinds: tuple[str, ...] | None = None) -> list[Triple]:
    """One triple per problem: y_w = the reference answer, y_l = a corruption of a kind drawn from
    `kinds` (default: every kind of the task) with a generator seeded by (seed, problem). Raises
    ValueError for a task without reference answers, and if a triple breaks quality(y_w) > quality(y_l)."""
    if task.name not in ("multistep", "arith"):
        raise ValueError(f"the built-in preference set is made from multistep or arith, not {task.name}")
    kinds = kinds or (MULTISTEP_KINDS if task.name == "multistep" else ARITH_KINDS)
    out = []
    for p in problems:
        rng = random.Random(f"{seed}/{p.prompt}")
        kind = rng.choice(kinds)
        y_w = p.meta["solution"] if task.name == "multistep" else p.answer
        y_l = corrupt(p, task.name, kind, rng)
        if not quality(task, p, y_w) > quality(task, p, y_l):
            raise ValueError(f"built-in triple breaks its own preference: {p.prompt!r} {y_w!r} {y_l!r}")
        out.append(Triple(p.prompt, y_w, y_l, p, kind))
    return out


# ------------------------------------------------------------------------------------ Hugging Face sets
def hh_triple(chosen: str, rejected: str) -> Triple | None:
    """Anthropic/hh-rlhf: both texts are the same dialogue ("\\n\\nHuman: …\\n\\nAssistant: …") up to
    the last assistant turn. x = the dialogue before it, y = the two last turns. None if they differ
    earlier or an answer is empty."""
    marker = "\n\nAssistant:"
    cut_w, cut_l = chosen.rfind(marker), rejected.rfind(marker)
    if cut_w < 0 or chosen[:cut_w] != rejected[:cut_l]:
        return None
    x = chosen[:cut_w].strip().removeprefix("Human:").strip()
    y_w, y_l = chosen[cut_w + len(marker):].strip(), rejected[cut_l + len(marker):].strip()
    return Triple(x, y_w, y_l) if x and y_w and y_l and y_w != y_l else None


def tldr_triple(row: dict) -> Triple | None:
    """openai/summarize_from_feedback (comparisons): x = the Reddit post, y_w = summaries[choice]."""
    info, summaries = row["info"], [s["text"].strip() for s in row["summaries"]]
    x = (f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info.get('title') or ''}\n"
         f"POST: {(info.get('post') or info.get('article') or '').strip()}\n\nWrite a TL;DR of this post.")
    y_w, y_l = summaries[row["choice"]], summaries[1 - row["choice"]]
    return Triple(x, y_w, y_l) if y_w and y_l and y_w != y_l else None


def hub_triples(name: str, split: str, n: int, seed: int, max_chars: int = 2000) -> list[Triple]:
    """n triples of a Hub preference set ("train" or "test"; TL;DR's test is its validation split), in
    a fixed shuffled order (train: by seed), skipping rows whose x is longer than `max_chars`."""
    path, config = HUB_PREFERENCES[name]
    try:
        ds = _load_hub_dataset(name, path, config)
    except SystemExit as e:  # the tasks' hint names tasks; here the offline choice is the built-in set
        raise SystemExit(str(e).replace(_OFFLINE_HINT, "use --preferences builtin (made offline from --task)")) from None
    rows = ds[split if split in ds else "validation"]
    order = list(range(len(rows)))
    random.Random(f"{name}/{split}/{seed if split == 'train' else 0}").shuffle(order)
    out = []
    for i in order:
        if len(out) == n:
            break
        row = rows[i]
        t = hh_triple(row["chosen"], row["rejected"]) if name == "hh-rlhf" else tldr_triple(row)
        if t is not None and len(t.x) <= max_chars:
            out.append(t)
    return out


# ------------------------------------------------------------------------------------ a standard RM as judge
def reward_model_judge(name: str, device):
    """score(xs, ys) -> [N] of a standard reward model R(x, y): an HF sequence-classification checkpoint with
    one logit that reads (x, y) as a text pair (e.g. a DeBERTa RM), a judge independent of the gap RM."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()

    @torch.no_grad()
    def score(xs: list[str], ys: list[str]) -> torch.Tensor:
        enc = tok(xs, ys, return_tensors="pt", padding=True, truncation=True, max_length=512).to(device)
        return model(**enc).logits[:, 0].float().cpu()
    return score

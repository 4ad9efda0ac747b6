"""Command-line flags: the experiment half every language-model script shares, and checking flags
before any work is done.

Each algorithm's `Args` extends `StepArgs` (a loop of `--total-steps` rollout steps) or `LMArgs`
(methods with outer iterations define `--iterations` themselves) and lists only its own
hyperparameters, with the paper's symbols. tyro shows the inherited fields in `--help` with their
docstrings; a subclass may re-declare a field to change its default.

Flags are checked before a model, a task or an environment is loaded and before a run directory
exists. A bad value ends the program with exit status 2 and one line naming the flag, the value and
what is allowed:

    error: --batch-size 0: must be > 0

The rules are declared next to the fields, as a class variable that tyro ignores:

    RULES: ClassVar[dict[str, str]] = {"batch_size": "> 0", "epsilon": "[0, 1]"}

A rule is a comparison (`> 0`, `>= 2`) or an interval (`[0, 1]`, `(0, 1]`), optionally followed by
`; reason`; None (an unset optional flag) always passes, and a tuple passes when each element does. `check_args` collects the RULES of
every class in the MRO, then calls the dataclass's own `check()` method (cross-field conditions),
if it has one. `PER_PROCESS` names the fields that must be divisible by the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from shared.models import DEFAULT_MODEL


# ------------------------------------------------------------------------------------ errors
def usage_error(message: str) -> None:
    """Exit with status 2 and `error: {message}` on one line of stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def require(ok: bool, flag: str, value: Any, allowed: str) -> None:
    """`usage_error("--flag value: allowed")` unless `ok`. `flag` is a field name or a flag."""
    if not ok:
        usage_error(f"{to_flag(flag)} {_show(value)}: {allowed}")


def to_flag(name: str) -> str:
    return name if name.startswith("--") else "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# ------------------------------------------------------------------------------------ rules
_COMPARISON = re.compile(r"(>=|<=|>|<)\s*(-?[0-9.e+-]+)")
_INTERVAL = re.compile(r"([\[(])\s*(-?[0-9.e+-]+)\s*,\s*(-?[0-9.e+-]+)\s*([\])])")


def holds(value: Any, rule: str) -> bool:
    """Whether `value` satisfies `rule` ("> 0", ">= 2", "[0, 1]", "(0, 1]", ...; text after a ";" is
    the reason shown in the error)."""
    rule = rule.split(";")[0]
    if value is None:
        return True
    if isinstance(value, (tuple, list)):
        return all(holds(v, rule) for v in value)
    if m := _COMPARISON.fullmatch(rule.strip()):
        op, bound = m.group(1), float(m.group(2))
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    if m := _INTERVAL.fullmatch(rule.strip()):
        lo, hi = float(m.group(2)), float(m.group(3))
        return (value >= lo if m.group(1) == "[" else value > lo) and (value <= hi if m.group(4) == "]" else value < hi)
    raise ValueError(f"unknown rule {rule!r}")


def _describe(rule: str) -> str:
    rule, _, reason = rule.partition(";")
    rule = rule.strip().replace(">=", "≥").replace("<=", "≤")
    text = f"must be in {rule}" if rule[0] in "[(" else f"must be {rule}"
    return f"{text} ({reason.strip()})" if reason else text


def rules_of(cls: type) -> dict[str, str]:
    """Every RULES entry along the MRO (a subclass's rule for a field replaces its parent's)."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("RULES", {}))
    return merged


def check_args(args: Any, world: int | None = None) -> None:
    """Exit with one line (status 2) at the first flag that breaks its rule; with `world` (the number
    of processes) also check the PER_PROCESS fields' divisibility."""
    names = {f.name for f in dataclasses.fields(args)}
    for name, rule in rules_of(type(args)).items():
        if name in names:
            value = getattr(args, name)
            require(holds(value, rule), name, value, _describe(rule))
    if hasattr(args, "check"):
        args.check()
    if world is not None:
        for name in getattr(type(args), "PER_PROCESS", ()):
            value = getattr(args, name)
            require(value is None or value % world == 0, name, value,
                    f"must be divisible by the {world} processes")


# ------------------------------------------------------------------------------------ parsing
def cli(cls: type) -> Any:
    """`tyro.cli(cls)`, with tyro's boxed parse errors folded into one `error:` line (status 2), then
    `check_args`. `--help` is printed by tyro as usual."""
    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(cls)
    except SystemExit as exit_:
        text = captured.getvalue()
        if exit_.code != 2:
            sys.stderr.write(text)
            raise
        usage_error(_fold_tyro_error(text))
    sys.stderr.write(captured.getvalue())  # tyro's warnings, if any
    check_args(args)
    return args


def _fold_tyro_error(text: str) -> str:
    """The message inside tyro's error box (the lines between its title and the first rule)."""
    lines = [line.strip().strip("│╭╮╰╯─ ").strip() for line in text.splitlines()]
    body = []
    for line in lines[1:]:
        if not line:
            if body:
                break
            continue
        body.append(line)
    return " ".join(body) or text.strip().replace("\n", " ")


# ------------------------------------------------------------------------------------ the shared flags
@dataclass
class LMArgs:
    """The experiment flags of every language-model script."""

    # ---- experiment
    model: str = DEFAULT_MODEL
    """model name, local path, or `tiny` (a random test model built in code)"""
    task: str = "arith"
    """`arith`, `multistep`, `countdown` (built in, offline) or an HF dataset name: `gsm8k`, `math500`, `countdown-hf`"""
    level: int = 1
    """difficulty level of a built-in task (arith 1 = two-digit addition; multistep 1 = two 1-digit ± steps)"""
    seed: int = 0
    """seed of the task split, the model init (`tiny`), sampling and shuffling"""
    output_dir: str = "runs"
    """runs land in `{output_dir}/{algo}__{task}__{seed}__{time}/`"""
    resume: str | None = None
    """run directory to resume from its `checkpoint/` (its args.json is reused; flags you pass override)"""
    track: bool = False
    """also log to TensorBoard in the run directory"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""
    n_train: int = 2000
    """training problems drawn from the task"""
    n_test: int = 200
    """held-out test problems: greedy accuracy reported at each evaluation, never used to choose anything"""
    n_dev: int = 100
    """dev problems (disjoint from train and test) for model selection and early stopping"""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)"""
    load_in_4bit: bool = False
    """4-bit base weights through bitsandbytes (CUDA only; needs --lora-r)"""
    load_in_8bit: bool = False
    """8-bit base weights through bitsandbytes (CUDA only; needs --lora-r)"""
    dtype: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """precision: fp32 weights and optimizer states with bf16 autocast forward passes (`bf16-mixed`,
    the default on CUDA), plain fp32 (the default on CPU), or pure bf16 weights (`bf16`: small updates
    round away)"""
    lr: float = 1e-5
    """AdamW learning rate (the papers use 1e-6 at 7B; 1e-5 suits a 135M model)"""
    max_new_tokens: int = 24
    """generation budget per answer (L_max); also used for the held-out evaluation"""
    temperature: float = 1.0
    """sampling temperature of training rollouts; log-probs use logits / T"""
    token_budget: int = 0
    """stop training once this many tokens have been generated for it, summed over processes (held-out
    evaluation excluded); the run then ends as after its last step. 0: no budget"""

    RULES: ClassVar[dict[str, str]] = {
        "token_budget": ">= 0", "level": ">= 1", "seed": ">= 0", "n_train": ">= 1", "n_test": ">= 1", "n_dev": ">= 0", "lora_r": ">= 0", "lr": ">= 0",
        "max_new_tokens": ">= 1", "temperature": ">= 0"}

    def check(self) -> None:
        from shared.tasks import TASKS, task_levels

        require(self.task in TASKS, "task", self.task, f"must be one of {', '.join(TASKS)}")
        levels = task_levels(self.task)
        if levels is not None:
            require(self.level in levels, "level", self.level,
                    f"{self.task} has levels {', '.join(map(str, sorted(levels)))}")
        require(not (self.load_in_4bit and self.load_in_8bit), "load_in_8bit", True, "choose one of --load-in-4bit and --load-in-8bit")
        require(self.lora_r > 0 or not (self.load_in_4bit or self.load_in_8bit), "lora_r", self.lora_r,
                "--load-in-4bit/8bit quantises frozen weights: pass --lora-r too")


@dataclass
class StepArgs(LMArgs):
    """LMArgs for a loop of rollout steps (GRPO, NFT, ...)."""

    total_steps: int = 12
    """number of rollout steps"""
    eval_every: int = 6
    """greedy held-out evaluation every this many steps (and always before and after training)"""
    save_every: int = 6
    """checkpoint every this many steps (and at the end, and on Ctrl-C)"""

    RULES: ClassVar[dict[str, str]] = {"total_steps": ">= 1", "eval_every": ">= 1", "save_every": ">= 1"}

"""SPC — Self-Play Critic: a step critic evolved by an adversarial game against a sneaky generator.

Paper: Chen et al., "SPC: Evolving Self-Play Critic via Adversarial Games for LLM Reasoning",
arXiv:2504.19162 (NeurIPS 2025); released trainer chen-judge/SPC (src/trainers.py). Spec:
shared/papers/spc.md (§ below). The method text was not retrievable: equations carry the spec's tags.

Two copies of one base model play a zero-sum game. The sneaky generator rewrites the correct next step
t_k of a correct partial solution into a subtly wrong t'_k of a chosen error type; t'_k enters the game
only if it really breaks the solution (a fixed solver, completing it N times from each step, succeeds
much less often from t'_k). The critic judges t'_k, and the paired t_k, with an analysis that ends in
<Answer>Correct</Answer> or <Answer>Incorrect</Answer>. Winner +1, loser −1; both roles are updated
offline on their game records against their frozen round-0 model.

    accept t'_k  ⇔  p_orig ≥ 0.75  and  p_sneaky ≤ p_orig − 0.5      (solver success, N = 8) [unverified]
    R_critic = +1 if its verdict is right, else −1;   R_sneaky = −R_critic on validated t'_k  (Fig. 2)
    R_sneaky = −1 if t'_k fails validation (no critic row);   unparseable verdict: no rows  (§2)
    ℓ̄_θ  = (1/|y|) Σ_t log π_θ(y_t | x, y_<t)          length-normalised, response tokens only [code]
    ρ    = exp(ℓ̄_θ − ℓ̄_ref)                            sequence-level ratio, π_ref = round-0 model [code]
    L_RL = −min(A ρ, A clip(ρ, 1 − ε, 1 + ε)),  A = R ∈ {±1} (SPAG form with β: A − β(ℓ̄_θ − ℓ̄_ref))
    L    = mean over a batch's rows of L_RL (game rows) and −α ℓ̄_θ (round-0 SFT rows, 1:1)  [code]

Choices (spec items marked [unverified] are flags with the spec's defaults):
- Two models, as in the paper: `critic` and `generator` are separate copies of `--model`, each with
  its own optimizer and its own frozen round-0 reference. The solver that validates sneaky steps, and
  writes the benchmark's own solutions, is a third, frozen copy of the base model.
- Round 0: the paper fine-tunes both roles on PRM800K with GPT-4 / R1 critiques. Instead, a
  programmatic teacher plants errors of three types (calculation error, misread number, wrong
  operation) in `multistep` reference solutions and writes a critique that recomputes the expected
  next step and a sneaky CoT naming the error type. The same file is the α-SFT data.
- Step data: reference solutions (`meta["steps"]`, correct by construction); `--step-source solver`
  uses the solver's own solutions that `check_steps` passes and that reach the gold answer.
- Responses end with EOS (the released collator appends none); rewards do not look at truncation: a
  verdict or a step either parses or it does not.
- A constant learning rate after warm-up (the paper: WarmupDecayLR over 3 epochs of a fixed file).
- One process only (the game is sequential and small); `main` refuses torchrun with one line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/spc.py` finds `shared`

import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from shared.args import LMArgs, cli, require, usage_error
from shared.logprobs import token_logprobs
from shared.rollouts import PromptStream
from shared.run import Run
from shared.sampling import generate, uncounted
from shared.step_errors import (ERROR_TYPES, Solution, benchmark_metrics, known_numbers, own_solutions, plant_any,
                                planted_solutions, problem_text, processbench_solutions)
from shared.steps import check_steps
from shared.verifiers import MAX_TEXT_CHARS


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --seed, --lr, ...) come from shared/args.py
    """SPC: a step critic and a sneaky generator (two copies of --model) trained by an adversarial game.
    Runs on one process (torchrun / accelerate launch are refused)."""

    task: str = "multistep"
    """step-level problems: only `multistep` has reference steps (`meta["steps"]`)"""
    n_train: int = 500
    """training problems (game positions and the round-0 SFT file)"""
    n_test: int = 60
    """held-out problems the step-error benchmark is built from"""
    n_dev: int = 0
    """dev problems (SPC selects nothing and stops nothing early, so none by default)"""
    max_new_tokens: int = 64
    """generation budget of a critique or a sneaky rewrite (and of the benchmark's critiques)"""
    iterations: int = 2
    """RL rounds of the game after round 0 (the paper: 2)"""
    # ---- round 0 (SFT)
    sft_steps: int = 40
    """round 0: SFT optimizer steps per role on the teacher file (0 = play from the base model)"""
    sft_batch_size: int = 16
    """round 0: rows per SFT step"""
    sft_lr: float = 5e-5
    """round 0: learning rate of the SFT steps (RL rounds use --lr)"""
    sft_examples: int = 2000
    """rows in each role's teacher file (round 0 and the α-SFT rows)"""
    # ---- the game
    games: int = 32
    """sneaky attempts per round (one problem, one position k each)"""
    step_source: Literal["reference", "solver"] = "reference"
    """where correct prefixes and steps come from: reference solutions, or the solver's own verified ones"""
    opponent: Literal["latest", "initial"] = "latest"
    """critic that plays the round: the current one, or the frozen round-0 critic (§3 pairing) [unverified]"""
    validation_rollouts: int = 8
    """N: solver completions from t_k and from t'_k each [unverified]"""
    p_orig_min: float = 0.75
    """accept t'_k only if p_orig ≥ this [unverified]"""
    min_drop: float = 0.5
    """... and p_sneaky ≤ p_orig − this [unverified]"""
    solver_temperature: float = 0.7
    """temperature of the solver's validation completions [unverified]"""
    solver_shots: int = 1
    """worked examples (training problems with their reference solutions) before the solver's problem"""
    solver_max_new_tokens: int = 32
    """budget of a solver completion (validation, own solutions, one search step)"""
    failed_validation: Literal["penalty", "drop"] = "penalty"
    """a sneaky step that fails validation (or does not parse): generator row with −1, or no row"""
    balance: bool = True
    """subsample each role's rows to as many +1 as −1 (the balancing game, §3) [unverified]"""
    strip_verdict: bool = False
    """strip whitespace inside <Answer> … </Answer> (the released parser does not)"""
    # ---- the objective (released trainer)
    epsilon: float = 0.2
    """ε: clip range of the sequence-level ratio ρ"""
    alpha: float = 0.15
    """α: weight of the SFT rows (`lm_sft_coeff`)"""
    kl_coeff: float = 0.0
    """β: SPAG's A − β(ℓ̄_θ − ℓ̄_ref) advantage (the released loss ignores its 0.1: default 0)"""
    reduction: Literal["per_row", "group_mean"] = "per_row"
    """mean over all rows (released: micro-batch 1) or mean_RL + α·mean_SFT"""
    epochs: int = 3
    """passes over each round's rows"""
    batch_size: int = 64
    """rows per optimizer step (global batch)"""
    micro_batch_size: int = 8
    """rows per forward/backward (gradient accumulation; no effect on the maths)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    warmup_steps: int = 0
    """linear warm-up in optimizer steps"""
    # ---- evaluation
    gen_batch_size: int = 64
    """rows per `generate` call"""
    search_problems: int = 0
    """after the last round, solve this many test problems step by step with and without critic pruning"""
    search_tries: int = 5
    """M: samples of a step before the search keeps a rejected one [unverified]"""
    search_max_steps: int = 6
    """lines per solution in the search"""
    processbench: Literal["gsm8k", "math", "olympiadbench", "omnimath"] | None = None
    """also evaluate the critic on this Qwen/ProcessBench subset (needs the Hub or its cache)"""

    RULES: ClassVar[dict[str, str]] = {
        "iterations": ">= 0", "sft_steps": ">= 0", "sft_batch_size": "> 0", "sft_lr": ">= 0", "sft_examples": ">= 1",
        "games": ">= 1", "validation_rollouts": ">= 1", "p_orig_min": "[0, 1]", "min_drop": "[0, 1]",
        "solver_temperature": ">= 0", "solver_shots": ">= 0", "solver_max_new_tokens": ">= 1", "epsilon": "[0, 1]", "alpha": ">= 0",
        "kl_coeff": ">= 0", "epochs": ">= 1", "batch_size": "> 0", "micro_batch_size": "> 0", "max_grad_norm": "> 0",
        "warmup_steps": ">= 0", "gen_batch_size": "> 0", "search_problems": ">= 0", "search_tries": ">= 1",
        "search_max_steps": ">= 1"}

    def check(self) -> None:
        super().check()
        require(self.task == "multistep", "task", self.task, "SPC needs step-level problems: use --task multistep")


# ------------------------------------------------------------------------------------ ALGO LOGIC: objective
def mean_logprob(logp: Tensor, mask: Tensor) -> Tensor:
    """ℓ̄ = Σ_t mask·log π / Σ_t mask per row [N]: response tokens only, so padding never enters (§7, 6b)."""
    mask = mask.to(logp.dtype)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)


def rl_row_loss(lbar: Tensor, lbar_ref: Tensor, adv: Tensor, *, epsilon: float = 0.2, kl_coeff: float = 0.0) -> Tensor:
    """−min(A ρ, A clip(ρ, 1−ε, 1+ε)) per row, ρ = exp(ℓ̄_θ − ℓ̄_ref); with β > 0 the advantage is
    A − β(ℓ̄_θ − ℓ̄_ref), not detached (SPAG; SPC commented it out)."""
    diff = lbar - lbar_ref.detach()
    ratio = torch.exp(diff)
    a = adv.to(lbar.dtype) - kl_coeff * diff if kl_coeff else adv.to(lbar.dtype)
    return -torch.min(a * ratio, a * torch.clamp(ratio, 1 - epsilon, 1 + epsilon))


def reduce_rows(rl_losses: Tensor, sft_lbar: Tensor, *, alpha: float = 0.15, reduction: str = "per_row",
                n_rl: int | None = None, n_sft: int | None = None) -> Tensor:
    """The batch loss from RL row losses and SFT rows' ℓ̄ (SFT row loss −α ℓ̄).

    per_row:    (Σ L_RL + Σ −α ℓ̄_SFT) / (n_RL + n_SFT)   (released: micro-batch 1, accumulation)
    group_mean: Σ L_RL / n_RL + α · Σ −ℓ̄_SFT / n_SFT        (`compute_loss` on one multi-row batch)
    n_rl / n_sft: the counts of the whole optimizer batch, so micro-batch losses sum to the batch's."""
    n_rl = rl_losses.numel() if n_rl is None else n_rl
    n_sft = sft_lbar.numel() if n_sft is None else n_sft
    sft = -alpha * sft_lbar.sum()
    if reduction == "per_row":
        return (rl_losses.sum() + sft) / max(n_rl + n_sft, 1)
    if reduction == "group_mean":
        return rl_losses.sum() / max(n_rl, 1) + sft / max(n_sft, 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def spc_loss(lbar, lbar_ref, adv, sft, *, epsilon=0.2, alpha=0.15, kl_coeff=0.0, reduction="per_row",
             n_rl=None, n_sft=None) -> tuple[Tensor, dict]:
    """The released critic loss on a batch of rows: lbar [N] (with gradient), lbar_ref [N] (read on RL
    rows only), adv [N] (±1, read on RL rows only), sft [N] bool (True: an SFT row)."""
    rl = ~sft
    losses = rl_row_loss(lbar[rl], lbar_ref[rl], adv[rl], epsilon=epsilon, kl_coeff=kl_coeff)
    loss = reduce_rows(losses, lbar[sft], alpha=alpha, reduction=reduction, n_rl=n_rl, n_sft=n_sft)
    with torch.no_grad():
        diff, a = lbar[rl] - lbar_ref[rl], adv[rl]
        clipped = ((a > 0) & (diff > math.log1p(epsilon))) | ((a < 0) & (diff < math.log1p(-epsilon)))
    return loss, {"clipped": int(clipped.sum()), "kl": float(diff.sum()), "n_rl": int(rl.sum())}


# ------------------------------------------------------------------------------------ ALGO LOGIC: the game
def parse_verdict(text: str, strip: bool = False) -> int:
    """+1 (Correct), −1 (Incorrect) or 0 (invalid): the text between the first <Answer> and the first
    </Answer> after it, lower-cased, exact match (§5). A missing closing tag is invalid (the released
    code's find() = −1 would accept "<Answer>Correct." as +1)."""
    text = text[:MAX_TEXT_CHARS]
    start = text.find("<Answer>")
    end = text.find("</Answer>", start) if start >= 0 else -1
    if end < 0:
        return 0
    word = text[start + len("<Answer>"):end]
    return {"correct": 1, "incorrect": -1}.get((word.strip() if strip else word).lower(), 0)


def parse_sneaky_step(text: str, original: str) -> str | None:
    """The last <Step>…</Step> block; None if missing, empty, several lines, the original step up to
    whitespace, or naming the error ("error", "incorrect") (§5)."""
    text = text[:MAX_TEXT_CHARS]
    end = text.rfind("</Step>")
    start = text.rfind("<Step>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    step = text[start + len("<Step>"):end].strip()
    if not step or "\n" in step or step.split() == original.split() or re.search("error|incorrect", step, re.I):
        return None
    return step


def accept_sneaky(p_orig: float, p_sneaky: float, p_orig_min: float = 0.75, min_drop: float = 0.5) -> bool:
    """Validation (§2): t'_k is a real error iff the solver mostly succeeds from t_k and much less from t'_k."""
    return p_orig >= p_orig_min - 1e-9 and p_sneaky <= p_orig - min_drop + 1e-9


def sneaky_rewards(validated: bool, verdict: int, failed: str = "penalty") -> tuple[int | None, int | None]:
    """(R_critic, R_sneaky) of one sneaky attempt (Fig. 2); None = no row."""
    if not validated:
        return None, (-1 if failed == "penalty" else None)
    if verdict == 0:
        return None, None
    return (1, -1) if verdict == -1 else (-1, 1)


def paired_reward(verdict: int) -> int | None:
    """R_critic on the original correct step t_k: +1 for Correct, −1 for Incorrect, no row if invalid."""
    return verdict if verdict else None


def balance(rewards: list[int], rng: random.Random) -> list[int]:
    """Indices of a sign-balanced subset: every row of the rarer sign and as many random ones of the other."""
    pos, neg = [i for i, r in enumerate(rewards) if r > 0], [i for i, r in enumerate(rewards) if r < 0]
    n = min(len(pos), len(neg))
    return sorted(rng.sample(pos, n) + rng.sample(neg, n))


# ------------------------------------------------------------------------------------ prompts and the teacher
CRITIC_SYSTEM = ("You are a critic. Summarise the Partial Solution, check the Last Step against it, then end with "
                 "<Answer>Correct</Answer> or <Answer>Incorrect</Answer>.")  # §5's three parts, shortened for a small model
GENERATOR_SYSTEM = ("You are a sneaky student. Rewrite the Correct Next Step so that it has one error of a listed type, "
                    "in the same style, without saying so. Name the error type, then write the new step in <Step></Step>.")
USER = "## Problem\n{problem}\n\n## Partial Solution\n{partial}\n\n## {what}\n{step}"
EMPTY_PARTIAL = "Let's solve this problem."


def critic_messages(problem: str, prefix: list[str], step: str) -> list[dict]:
    user = USER.format(problem=problem, partial="\n".join(prefix) or EMPTY_PARTIAL, what="Last Step", step=step)
    return [{"role": "system", "content": CRITIC_SYSTEM}, {"role": "user", "content": user}]


def generator_messages(problem: str, prefix: list[str], step: str) -> list[dict]:
    types = "\n".join(f"{i}. {t}" for i, t in enumerate(ERROR_TYPES, 1))
    user = USER.format(problem=problem, partial="\n".join(prefix) or EMPTY_PARTIAL, what="Correct Next Step",
                       step=step) + f"\n\n## Error Types\n{types}"
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": user}]


def critic_target(prefix: list[str], expected: str, step: str, correct: bool) -> str:
    """The teacher's critique in §5's format: a summary, the recomputed next step, the verdict."""
    summary = f"So far: {'; '.join(prefix)}." if prefix else "Nothing is computed yet."
    return (f"{summary} Next: {expected}. The last step {step} is {'right' if correct else 'wrong'}.\n"
            f"<Answer>{'Correct' if correct else 'Incorrect'}</Answer>")


def generator_target(kind: int, change: str, wrong: str) -> str:
    return f"Error Type {kind + 1}: {ERROR_TYPES[kind]}. I {change}.\n<Step>{wrong}</Step>"  # Fig. 2's sneaky CoT


def teacher_examples(problems, n: int, seed: int) -> tuple[list, list]:
    """Round-0 SFT files: (critic examples, generator examples), n each, as (messages, target) pairs.
    Every (problem, position) gives the generator one planted error and the critic that error and the
    correct step (half and half)."""
    rng, critic, generator = random.Random(f"spc/teacher/{seed}"), [], []
    order = [(i, k) for i, p in enumerate(problems) for k in range(len(p.meta["steps"]))]
    rng.shuffle(order)
    for i, k in (order * (1 + 2 * n // max(len(order), 1)))[:n]:
        p = problems[i]
        steps, text = p.meta["steps"], problem_text(p)
        wrong, kind, change = plant_any(steps[k], known_numbers(p, steps[:k]), rng)
        generator.append((generator_messages(text, steps[:k], steps[k]), generator_target(kind, change, wrong)))
        for step, ok in ((steps[k], True), (wrong, False)):
            critic.append((critic_messages(text, steps[:k], step), critic_target(steps[:k], steps[k], step, ok)))
    return critic[:n], generator[:n]


# ------------------------------------------------------------------------------------ helpers
@dataclass
class Row:
    """A training row: prompt and response token ids; adv = the game reward, None for an SFT row."""
    prompt: list[int]
    response: list[int]
    adv: float | None = None


@dataclass
class Role:
    """One player: its policy LM (shared.run.LM) and its frozen round-0 reference."""
    name: str
    lm: object
    ref: object = None
    sft: list = field(default_factory=list)  # its round-0 teacher file as Rows


def encode_chat(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sft_row(tokenizer, messages: list[dict], target: str) -> Row:
    prompt = tokenizer(encode_chat(tokenizer, messages), add_special_tokens=False).input_ids
    return Row(prompt, tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])


def rollout_rows(ro, rows: list[int], advs: list[float]) -> list[Row]:
    """Rows (prompt, the sampled response up to and including EOS, reward) from a Rollout."""
    return [Row(ro.prompt_ids[i][ro.prompt_mask[i].bool()].tolist(), ro.completion_ids[i][ro.completion_mask[i].bool()].tolist(), a)
            for i, a in zip(rows, advs)]


def pad_rows(rows: list[Row], pad_id: int, device) -> tuple[Tensor, ...]:
    """Prompts left-padded, responses right-padded (the Rollout layout); masks 1 on real tokens only."""
    P, C = max(len(r.prompt) for r in rows), max(len(r.response) for r in rows)
    p_ids, c_ids = torch.full((len(rows), P), pad_id), torch.full((len(rows), C), pad_id)
    p_mask, c_mask = torch.zeros(len(rows), P, dtype=torch.long), torch.zeros(len(rows), C)
    for i, r in enumerate(rows):
        p_ids[i, P - len(r.prompt):], p_mask[i, P - len(r.prompt):] = torch.tensor(r.prompt), 1
        c_ids[i, :len(r.response)], c_mask[i, :len(r.response)] = torch.tensor(r.response), 1
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


def row_lbar(model, rows: list[Row], pad_id: int, device) -> Tensor:
    batch = pad_rows(rows, pad_id, device)
    return mean_logprob(token_logprobs(model, *batch), batch[3])


def train_rows(role: Role, rows: list[Row], args: Args, gen: torch.Generator, *, epochs: int, batch_size: int,
               alpha: float) -> dict:
    """`epochs` shuffled passes over `rows`, one optimizer step per `batch_size` rows, loss `spc_loss`."""
    lm, pad, sums = role.lm, role.lm.tokenizer.pad_token_id, Counter()
    device = lm.accelerator.device
    rl = [i for i, r in enumerate(rows) if r.adv is not None]
    lref = torch.zeros(len(rows), device=device)
    with torch.no_grad():  # ℓ̄_ref once: π_ref is frozen
        for chunk in [rl[j:j + args.micro_batch_size] for j in range(0, len(rl), args.micro_batch_size)]:
            lref[chunk] = row_lbar(role.ref, [rows[i] for i in chunk], pad, device)
    adv = torch.tensor([r.adv or 0.0 for r in rows], device=device)
    is_sft = torch.tensor([r.adv is None for r in rows], device=device)
    lm.model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(rows), generator=gen).split(batch_size):
            n_rl = int((~is_sft[batch]).sum())
            for micro in batch.split(args.micro_batch_size):
                lbar = row_lbar(lm.model, [rows[i] for i in micro.tolist()], pad, device)
                loss, s = spc_loss(lbar, lref[micro], adv[micro], is_sft[micro], epsilon=args.epsilon, alpha=alpha,
                                   kl_coeff=args.kl_coeff, reduction=args.reduction, n_rl=n_rl, n_sft=len(batch) - n_rl)
                lm.accelerator.backward(loss)
                sums.update(s | {"loss": loss.item()})
            sums["grad_norm"] += float(lm.accelerator.clip_grad_norm_(lm.params, args.max_grad_norm))
            lm.optimizer.step()
            lm.scheduler.step()
            lm.optimizer.zero_grad(set_to_none=True)
            sums["steps"] += 1
    n = max(sums["steps"], 1)
    return {"loss": sums["loss"] / n, "grad_norm": sums["grad_norm"] / n, "clip_frac": sums["clipped"] / max(sums["n_rl"], 1),
            "kl": sums["kl"] / max(sums["n_rl"], 1), "opt_steps": sums["steps"]}


def sample(model, tokenizer, prompts: list[str], args: Args, *, n: int = 1, temperature: float = 1.0,
           max_new_tokens: int | None = None):
    return generate(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens or args.max_new_tokens,
                    temperature=max(temperature, 1e-6), greedy=temperature == 0, batch_size=args.gen_batch_size)


def judge(model, tokenizer, items: list[tuple[str, list[str], str]], args: Args, temperature: float):
    """The critic on (problem, prefix, step) items: (rollout, verdicts)."""
    ro = sample(model, tokenizer, [encode_chat(tokenizer, critic_messages(*it)) for it in items], args, temperature=temperature)
    return ro, [parse_verdict(t, args.strip_verdict) for t in ro.texts]


def solver_prompt(tokenizer, task, problem, args: Args) -> str:
    """The solver's chat: `solver_shots` worked examples (the first training problems and their reference
    solutions), then the problem; the assistant's turn is open (a partial solution may be appended)."""
    shots = [m for ex in task.train[:args.solver_shots] for m in ({"role": "user", "content": ex.prompt},
                                                                  {"role": "assistant", "content": ex.meta["solution"]})]
    return encode_chat(tokenizer, shots + [{"role": "user", "content": problem.prompt}])


def up_to_answer(text: str) -> str:
    """A solution ends at its first "Answer" line: what a small solver rambles on about afterwards is not graded."""
    m = re.search(r"answer[^\n]*", text, re.IGNORECASE)
    return text[:m.end()] if m else text


def solver_success(solver, tokenizer, task, items: list[tuple], args: Args) -> list[float]:
    """p: the share of N solver completions, from (problem, prefix + [step]), whose answer is the gold one."""
    N = args.validation_rollouts
    if not items:
        return []
    heads = ["".join(s + "\n" for s in prefix + [step]) for _, prefix, step in items]
    prompts = [solver_prompt(tokenizer, task, p, args) + h for (p, _, _), h in zip(items, heads)]
    ro = sample(solver, tokenizer, prompts, args, n=N, temperature=args.solver_temperature, max_new_tokens=args.solver_max_new_tokens)
    return [sum(task.verify(up_to_answer(heads[i] + ro.texts[i * N + j]), items[i][0]).correct for j in range(N)) / N
            for i in range(len(items))]


def evaluate_critic(model, tokenizer, solutions: list[Solution], args: Args) -> dict[str, float]:
    """Greedy critiques of every step up to each solution's first error (temperature 0, as the eval script)."""
    items = [(s.problem, s.steps[:j], s.steps[j]) for s in solutions for j in range(len(s.steps))]
    with uncounted():  # evaluation: not part of the --token-budget
        _, verdicts = judge(model, tokenizer, items, args, temperature=0.0)
    it = iter(verdicts)  # back into one list per solution
    return benchmark_metrics(solutions, [[next(it) for _ in s.steps] for s in solutions])


def game_positions(problems, solver, tok, task, rng: random.Random, args: Args) -> list[tuple]:
    """(problem, correct prefix, correct next step t_k) with k uniform over a verified-correct solution:
    the reference steps, or the solver's own solution when `check_steps` passes it and its answer is right."""
    if args.step_source == "solver":
        texts = [up_to_answer(t) for t in sample(solver, tok, [solver_prompt(tok, task, p, args) for p in problems], args,
                 temperature=args.solver_temperature, max_new_tokens=args.solver_max_new_tokens * 2).texts]
        checked = [(p, check_steps(t, p.meta["numbers"]), task.verify(t, p).correct) for p, t in zip(problems, texts)]
        solutions = [(p, [c.text for c in rep.steps]) for p, rep, ok in checked if ok and rep.all_ok]
    else:
        solutions = [(p, p.meta["steps"]) for p in problems]
    return [(p, steps[:k], steps[k]) for p, steps in solutions for k in [rng.randrange(len(steps))]]


def play_round(critic, generator, solver, tok, task, problems, rng: random.Random, args: Args) -> tuple[list, list, dict]:
    """One round of the game (§3 steps a–e): sneaky rewrites, validation by solver rollouts, the critic on
    each validated t'_k and its paired t_k, rewards, balancing. Returns (critic rows, generator rows, metrics)."""
    t0 = time.time()
    critic.eval(), generator.eval()
    games = game_positions(problems, solver, tok, task, rng, args)
    ro_g = sample(generator, tok, [encode_chat(tok, generator_messages(problem_text(p), pre, s)) for p, pre, s in games],
                  args, temperature=args.temperature)
    sneaky = [parse_sneaky_step(text, s) for text, (_, _, s) in zip(ro_g.texts, games)]
    t1, parsed = time.time(), [i for i, s in enumerate(sneaky) if s]
    p = solver_success(solver, tok, task, [games[i] for i in parsed] + [(*games[i][:2], sneaky[i]) for i in parsed], args)
    p_orig, p_sneaky = p[:len(parsed)], p[len(parsed):]
    validated = [i for i, po, ps in zip(parsed, p_orig, p_sneaky) if accept_sneaky(po, ps, args.p_orig_min, args.min_drop)]
    t2 = time.time()
    items = [(problem_text(games[i][0]), games[i][1], sneaky[i]) for i in validated] + \
            [(problem_text(games[i][0]), games[i][1], games[i][2]) for i in validated]  # t'_k, then the paired t_k
    ro_c, verdicts = judge(critic, tok, items, args, args.temperature) if items else (None, [])
    t3, n = time.time(), len(validated)
    on_sneaky = {i: sneaky_rewards(True, v) for i, v in zip(validated, verdicts)}  # (R_critic, R_sneaky)
    g_adv = [on_sneaky[i][1] if i in on_sneaky else sneaky_rewards(False, 0, args.failed_validation)[1] for i in range(len(games))]
    c_adv = [on_sneaky[i][0] for i in validated] + [paired_reward(v) for v in verdicts[n:]]
    g_keep, c_keep = [i for i, a in enumerate(g_adv) if a is not None], [j for j, a in enumerate(c_adv) if a is not None]
    if args.balance:
        g_keep = [g_keep[j] for j in balance([g_adv[i] for i in g_keep], rng)]
        c_keep = [c_keep[j] for j in balance([c_adv[i] for i in c_keep], rng)]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")
    judged, paired = [v for v in verdicts[:n] if v], [v for v in verdicts[n:] if v]
    c_all = [a for a in c_adv if a is not None]
    tokens = ro_g.completion_mask.sum().item() + (ro_c.completion_mask.sum().item() if ro_c else 0)
    metrics = {"train/reward": mean(c_all), "train/accuracy": mean([a == 1 for a in c_all]), "spc/games": len(games),
               "spc/parsed": len(parsed), "spc/validated": n, "spc/validated_yield": n / max(len(games), 1),
               "spc/p_orig": mean(p_orig), "spc/p_sneaky": mean(p_sneaky), "spc/critic_win_rate": mean([v == -1 for v in judged]),
               "spc/generator_win_rate": mean([v == 1 for v in judged]), "spc/paired_accuracy": mean([v == 1 for v in paired]),
               "spc/critic_valid_rate": mean([v != 0 for v in verdicts]), "spc/critic_rows": len(c_keep),
               "spc/generator_rows": len(g_keep), "spc/generator_reward": mean([g_adv[i] for i in g_keep]),
               "perf/gen_s": t1 - t0, "perf/validate_s": t2 - t1, "perf/judge_s": t3 - t2,
               "perf/tokens_per_s": tokens / max(t1 - t0 + t3 - t2, 1e-9)}
    c_rows = rollout_rows(ro_c, c_keep, [c_adv[j] for j in c_keep]) if c_keep else []
    return c_rows, rollout_rows(ro_g, g_keep, [g_adv[i] for i in g_keep]), metrics


def step_search(solver, critic, tokenizer, task, problems, args: Args) -> float:
    """Accuracy of step-by-step solving in which the critic (None: no critic) prunes each equation line
    it judges Incorrect: the line is re-sampled up to M times, the last try is kept (§5)."""
    texts, done = [""] * len(problems), [False] * len(problems)
    for _ in range(args.search_max_steps):
        todo = [i for i in range(len(problems)) if not done[i]]
        for attempt in range(args.search_tries if critic is not None else 1):
            if not todo:
                break
            prompts = [solver_prompt(tokenizer, task, problems[i], args) + texts[i] for i in todo]
            ro = sample(solver, tokenizer, prompts, args, temperature=args.solver_temperature,
                        max_new_tokens=args.solver_max_new_tokens)
            lines = [t.lstrip("\n").split("\n")[0] for t in ro.texts]
            ends = [not t.lstrip("\n").count("\n") and not tr for t, tr in zip(ro.texts, ro.truncated.tolist())]
            judged = [k for k, line in enumerate(lines) if critic is not None and "=" in line and attempt < args.search_tries - 1]
            verdicts = dict(zip(judged, judge(critic, tokenizer, [(problem_text(problems[todo[k]]), texts[todo[k]].split("\n")[:-1],
                                                                    lines[k]) for k in judged], args, 0.0)[1] if judged else []))
            rejected = []
            for k, i in enumerate(todo):
                if verdicts.get(k, 1) == -1:
                    rejected.append(i)
                    continue
                texts[i] += lines[k] + "\n"
                done[i] = ends[k] or "answer" in lines[k].lower()
            todo = rejected
    return sum(task.verify(t, p).correct for t, p in zip(texts, problems)) / max(len(problems), 1)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        usage_error("spc runs on one process: start it with python, not torchrun/accelerate launch")
    run = Run("spc", args)  # flags, resume, task, run dir (shared/run.py)
    args, task, log = run.args, run.task, run.log
    sft_factor = args.sft_lr / args.lr if args.lr else 0.0
    schedule = lambda s: (sft_factor if s < args.sft_steps else min(1.0, (s - args.sft_steps + 1) / max(args.warmup_steps, 1)))  # noqa: E731
    critic = Role("critic", run.setup_lm(lr_lambda=schedule, restore=False))
    generator = Role("generator", run.setup_lm(lr_lambda=schedule, restore=False))  # a second copy of the base
    tok = critic.lm.tokenizer
    solver = run.frozen_copy(critic.lm)  # the base model: validates sneaky steps, writes the benchmark's own solutions
    state = run.restore(critic.lm)
    if state:  # the generator rides in the critic's checkpoint, so both are saved in one atomic swap
        g = state.pop("generator")
        generator.lm.policy.load_state_dict(g["params"], strict=False)
        generator.lm.optimizer.load_state_dict(g["optimizer"])
        generator.lm.scheduler.load_state_dict(g["scheduler"])
    sft_step, rounds = state.get("sft_step", 0), state.get("round", 0)
    stream = PromptStream(len(task.train), args.seed, state.get("cursor", 0))

    # ---- the round-0 teacher files (deterministic from the seed)
    for role, examples in zip((critic, generator), teacher_examples(task.train, args.sft_examples, args.seed)):
        role.sft = [sft_row(tok, m, t) for m, t in examples]
    sft_stream = PromptStream(len(critic.sft), args.seed, state.get("sft_cursor", 0))

    # ---- the step-error benchmark: planted first errors + the base model's own wrong solutions (greedy,
    # so a resumed run rebuilds the same one)
    with uncounted():
        texts = [up_to_answer(t) for t in sample(solver, tok, [solver_prompt(tok, task, p, args) for p in task.test], args,
                 temperature=0.0, max_new_tokens=args.solver_max_new_tokens * 2).texts]
    own, unlocated = own_solutions(task.test, texts, lambda t, p: task.verify(t, p).correct)
    bench = planted_solutions(task.test, args.seed) + own
    (run.dir / "benchmark.json").write_text(json.dumps({"unlocated_own_errors": unlocated,
                                                        "solutions": [s.__dict__ for s in bench]}, indent=1))
    pb = processbench_solutions(args.processbench) if args.processbench else None
    log(f"benchmark: {len(bench)} solutions ({sum(s.source == 'own' for s in bench)} own wrong), "
        f"{sum(len(s.steps) for s in bench)} steps")

    def evaluate(stage: int, name: str) -> dict:
        t = time.time()
        critic.lm.model.eval()
        res = evaluate_critic(critic.lm.model, tok, bench, args)
        extra = {f"processbench/{k}": v for k, v in evaluate_critic(critic.lm.model, tok, pb, args).items()} if pb else {}
        run.logger.log({f"eval/{k}": v for k, v in res.items()} | extra | {"perf/eval_s": time.time() - t,
                                                                           "perf/gen_tokens": run.tokens_spent()}, stage)
        log(f"{name}: benchmark step accuracy {res['accuracy']:.3f} (correct {res['acc_correct_step']:.3f}, error "
            f"{res['acc_error_step']:.3f}), F1 {res['f1']:.3f}, valid {res['valid_rate']:.3f}")
        return res

    def extras() -> dict:  # the loop counters and the whole generator, saved with the critic
        g = {"params": trainable_state(generator.lm.policy), "optimizer": generator.lm.optimizer.state_dict(),
             "scheduler": generator.lm.scheduler.state_dict()}
        return dict(sft_step=sft_step, round=rounds, cursor=stream.cursor, sft_cursor=sft_stream.cursor, generator=g)

    stage = lambda: sft_step + rounds  # noqa: E731  the x-axis of the metrics: SFT steps, then rounds
    before = last = evaluate(0, "base model") if sft_step == 0 and rounds == 0 else None
    try:
        # ---- round 0: SFT of both roles on the teacher files
        while sft_step < args.sft_steps:
            t0, batch = time.time(), sft_stream.take(args.sft_batch_size)
            with run.atomic():
                m = {}
                for role in (critic, generator):
                    gen = torch.Generator().manual_seed(args.seed * 100_003 + sft_step)
                    s = train_rows(role, [role.sft[i % len(role.sft)] for i in batch], args, gen, epochs=1,
                                   batch_size=args.sft_batch_size, alpha=1.0)
                    m |= {f"sft/{role.name}_loss": s["loss"], f"sft/{role.name}_grad_norm": s["grad_norm"]}
                sft_step += 1
                run.logger.log(m | {"perf/step_s": time.time() - t0, "train/lr": critic.lm.scheduler.get_last_lr()[0]}, sft_step)
            if sft_step == args.sft_steps:
                last = evaluate(stage(), "after round 0 (SFT)")
                run.save(critic.lm, **extras())
        if not (run.dir / "round0.pt").exists():  # Critic-0 and Generator-0: the references
            torch.save({r.name: trainable_state(r.lm.policy) for r in (critic, generator)}, run.dir / "round0.tmp")
            os.replace(run.dir / "round0.tmp", run.dir / "round0.pt")
        refs = torch.load(run.dir / "round0.pt")
        for role in (critic, generator):
            role.ref = run.frozen_copy(role.lm)  # a frozen copy, then Critic-0 / Generator-0 weights
            role.ref.load_state_dict(refs[role.name], strict=False)

        # ---- rounds 1..R of the game
        while rounds < args.iterations and run.budget_left():  # --token-budget spent: end as after the last round
            t0, r = time.time(), rounds + 1
            rng = random.Random(f"spc/round/{args.seed}/{r}")
            problems = [task.train[i] for i in stream.take(args.games)]
            player = critic.lm.model if args.opponent == "latest" else critic.ref
            c_rows, g_rows, metrics = play_round(player, generator.lm.model, solver, tok, task, problems, rng, args)
            t1 = time.time()
            with run.atomic():  # both updates and their bookkeeping, or neither
                for role, rows in ((critic, c_rows), (generator, g_rows)):
                    if not rows:
                        continue
                    sft = [role.sft[i] for i in rng.sample(range(len(role.sft)), min(len(rows), len(role.sft)))]  # 1:1
                    gen = torch.Generator().manual_seed(args.seed * 100_003 + 1000 * r + len(role.name))
                    s = train_rows(role, rows + sft, args, gen, epochs=args.epochs, batch_size=args.batch_size, alpha=args.alpha)
                    prefix = "train" if role is critic else "spc/generator"
                    metrics |= {f"{prefix}/{k}": v for k, v in s.items()}
                rounds = r
                run.logger.log(metrics | {"perf/update_s": time.time() - t1, "perf/step_s": time.time() - t0,
                                          "train/lr": critic.lm.scheduler.get_last_lr()[0]}, stage())
            log(f"round {r}: {metrics['spc/parsed']}/{metrics['spc/games']} sneaky steps parsed, {metrics['spc/validated']} "
                f"validated; critic wins {metrics['spc/critic_win_rate']:.2f} of sneaky games, paired accuracy "
                f"{metrics['spc/paired_accuracy']:.2f}; rows: critic {len(c_rows)}, generator {len(g_rows)}")
            last = evaluate(stage(), f"after round {r}")
            run.save(critic.lm, **extras())
        if args.search_problems:
            probs = task.test[:args.search_problems]
            with uncounted():
                plain, pruned = [step_search(solver, c, tok, task, probs, args) for c in (None, critic.lm.model)]
            run.logger.log({"search/accuracy_solver": plain, "search/accuracy_critic": pruned,
                            "perf/gen_tokens": run.tokens_spent()}, stage())
            log(f"step search on {len(probs)} test problems: solver alone {plain:.3f}, with critic pruning {pruned:.3f}")
        if not (run.dir / "checkpoint").exists():  # nothing to train (--sft-steps 0 --iterations 0)
            run.save(critic.lm, **extras())
    except KeyboardInterrupt:
        run.save_on_interrupt(critic.lm, f"{sft_step} SFT steps and {rounds} rounds", **extras())
        raise
    finally:
        run.close()
    return run.summary(critic.lm, None, None) | {"before": before, "after": last, "generator": generator.lm.policy}


if __name__ == "__main__":
    main(cli(Args))

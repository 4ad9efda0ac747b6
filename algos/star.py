"""STaR — Self-Taught Reasoner (default), and B-STaR (`--mode bstar`), its balanced online variant.

Papers: Zelikman, Wu, Mu, Goodman, "STaR: Bootstrapping Reasoning With Reasoning", arXiv:2203.14465
(Alg. 1, Eqs. 1–2); Zeng et al., "B-STaR: Monitoring and Balancing Exploration and Exploitation in
Self-Taught Reasoners", arXiv:2412.17256 (§2.3, §3, Alg. 1). Spec: shared/papers/star.md (§ below).

STaR (Alg. 1): each iteration the model M_{n−1} writes a rationale and an answer for every training
question (greedy). Right answers are kept (D_n). For the wrong ones it is asked again with the gold
final answer as a hint ("rationalization"); right rationalized answers are kept *as if no hint had
been given* (D_n^rat). The BASE model M is then fine-tuned on D_n ∪ D_n^rat, from scratch, for a
growing number of steps, giving M_n. Repeat; keep the iteration that is best on dev.
B-STaR: the same loop as online rejection fine-tuning (K samples per question, no rationalization,
no restart), with one extra step first: pick the sampling temperature t and the reward threshold τ
that maximise the balance score on a query subset, then sample at t and keep r > τ.

    J(M)  = Σ_i E_{(r̂,ŷ)~p_M(·|x_i)} 1[ŷ_i = y_i]                      STaR Eq. 1 (0/1-reward policy gradient)
    L(θ)  = −Σ_{(x,r,y) ∈ D_n ∪ D_n^rat} log p_θ(r, y | x)             completion tokens only, x hint-free (§2)
    s_n   = int(40 · 1.2^(n−1))                                        SFT steps in STaR iteration n (§4)
    r     = 1[â = a*] + r_prm(x, ŷ)                                    B-STaR reward ("Answer+PRM"); keep iff r > τ (§2)
    bs_i  = min(n'_i / n*, 1) · n'_i / n_i   (0 if n_i = 0)            balance score: exploration · exploitation (§2)
    n*    = ⌈N / M⌉                                                    N answers wanted per iteration over M queries
    (t_i, τ_i) = argmax_{t ∈ T, τ ∈ Θ} mean_i bs_i                      on a query subset, with P_{i−1} (§3)
n_i: selected distinct answers of query i; n'_i: the right ones among them.

The task must ask for reasoning: `multistep` by default ("7 - 5 = 2", "2 + 8 = 10", "Answer: 10"),
whose steps `shared.steps.check_steps` grades exactly; `arith` ("Give only the final number") is refused.
That checker is r_prm unless `--prm PATH` names a PRM checkpoint: +1 when every step is right and uses
only numbers of the problem or of earlier steps, −1 + 2j/m when the first wrong step is j (0-based) of
m, −1 without steps. A right answer through a wrong step (r < 2) ranks below a clean one (r = 2); a
wrong answer with clean steps (r = 1) passes a low τ, so the exploitation term n'/n has work to do.
n* keeps the paper's N/M = 67,500/11,500: n* = 6 whatever M and K (`--num-selected` sets N).

Choices (spec §7 lists the code/paper differences): a chat prompt instead of ten few-shot exemplars,
so the hint is a sentence giving the final answer only (pitfall 2); answers that never end within
--max-new-tokens are dropped (as B-STaR drops outputs without "# Answer"); τ is searched on the subset
as in the paper; no per-query cap and no gold solutions among the candidates (code-only, §7.5–7.6);
the step checker as r_prm is our extension; greedy accuracy on the dev split picks the best iteration
and drives --patience, test is only reported; P_0 is the instruct model (no SFT epoch of our own).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/star.py` finds `shared`

import copy
import dataclasses
import json
import math
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from shared.args import LMArgs, cli, require
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.run import LM, Run
from shared.sampling import generate, generated_tokens, uncounted
from shared.steps import check_steps


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --lr, ...) come from shared/args.py
    task: str = "multistep"
    """a task whose answers carry reasoning: multistep, gsm8k, math500, countdown(-hf); not arith"""
    iterations: int = 3
    """outer iterations (STaR n = 1..N_iter; B-STaR i = 1..I, 9 in the paper)"""
    patience: int = 0
    """stop after this many iterations without a new best dev accuracy (0 = run every iteration)"""
    n_train: int = 1000
    """training questions, all answered every iteration (M)"""
    max_new_tokens: int = 96
    """generation budget per answer (rationale + answer); also used for the dev and test evaluations"""
    temperature: float = 0.0
    """STaR: temperature of rationale generation (0 = greedy, as in the paper); B-STaR searches its own"""

    # ---- algorithm
    mode: Literal["star", "bstar"] = "star"
    """`star` (Zelikman et al.) or `bstar` (Zeng et al.); presets the fields below left at None"""
    restart_from_base: bool | None = None
    """fine-tune from the base weights with a fresh optimizer each iteration (STaR True; B-STaR False, pitfall 3)"""
    rationalize: bool = True
    """STaR: ask again with the gold answer as a hint where the first answer was wrong (p_rationalization = 1)"""
    hint_template: str = "{prompt} (Hint: the answer is {answer}.)"
    """STaR: the rationalization question; {answer} is the final answer only (pitfall 2), never stored"""
    steps: int | None = None
    """s_1: SFT steps in iteration 1 (STaR 40; B-STaR 500 at batch 128 in the paper, 40 here at batch 8)"""
    step_growth: float | None = None
    """s_n = int(s_1 · g^(n−1)) (STaR g = 1.2, `--exponential_grow`; B-STaR g = 1: constant)"""
    batch_size: int = 8
    """sequences per SFT step (STaR 8 packed sequences; B-STaR 128)"""
    micro_batch_size: int = 8
    """sequences per forward/backward on one process (gradient accumulation; no effect on the maths)"""
    warmup_steps: int | None = None
    """linear warm-up in SFT steps (STaR 100, restarted with the weights; B-STaR 0)"""
    lr_schedule: Literal["constant", "cosine"] | None = None
    """after warm-up: constant (STaR) or cosine over all iterations' steps down to min_lr_ratio·lr (B-STaR)"""
    min_lr_ratio: float = 2e-7 / 4.12e-6
    """B-STaR: final / peak lr of the cosine (2e-7 / 4.12e-6 in train_bstar.sh)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    gen_batch_size: int = 64
    """rows (prompt copies) per `generate` call"""
    group_size: int = 8
    """K: answers per query for B-STaR sampling and for the Pass@K / Reward@K monitors (paper 64)"""
    pass_s: int = 2
    """S in Pass@K-S and Reward@K-S (the paper reports Pass@32-4)"""
    subset_size: int = 100
    """queries in the config-search / monitoring subset (paper 600 of 11.5K); 0 = no monitors (STaR)"""
    monitor_temperature: float = 1.0
    """temperature of the K samples behind Pass@K, diversity, Best-of-K, Reward@K-S (both modes)"""
    temperatures: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
    """B-STaR grid T of sampling temperatures (§4)"""
    thresholds: tuple[float, ...] = tuple(round(-1 + 0.1 * i, 1) for i in range(21))
    """B-STaR grid Θ of reward thresholds τ, searched whenever there is a process reward (§4)"""
    threshold: float = 0.0
    """B-STaR τ without a process reward: r ∈ {0, 1}, so any τ in [0, 1) keeps exactly the right answers"""
    num_selected: int | None = None
    """N: answers wanted per iteration, n* = ⌈N/M⌉ (None: the paper's ratio 67,500 per 11,500 queries, n* = 6)"""
    prm: str = "auto"
    """r_prm: `auto` (step checker on multistep, else none), `steps`, `none`, or a PRM checkpoint (HF, one logit)"""

    RULES: ClassVar[dict[str, str]] = {
        "iterations": ">= 1", "patience": ">= 0", "steps": ">= 0", "step_growth": "> 0", "batch_size": "> 0",
        "micro_batch_size": "> 0", "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "max_grad_norm": "> 0",
        "gen_batch_size": "> 0", "group_size": ">= 1", "pass_s": ">= 1", "subset_size": ">= 0",
        "monitor_temperature": ">= 0", "temperatures": "> 0", "thresholds": "[-1, 2]", "threshold": "[-1, 2]",
        "num_selected": ">= 1", "n_dev": ">= 1; the dev split picks the best iteration"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # SFT examples are split across processes

    def check(self) -> None:
        super().check()
        require(self.task != "arith", "task", self.task, "its prompt asks for the final number only, so there is "
                "no rationale to learn: use multistep (or gsm8k, math500, countdown)")
        require(self.prm != "steps" or self.task == "multistep", "prm", self.prm,
                "the step checker needs a task with step-by-step reference solutions (multistep)")
        require(self.mode != "bstar" or self.subset_size >= 1, "subset_size", self.subset_size,
                "--mode bstar searches its temperature on a query subset: must be ≥ 1")


MODES = {  # the fields a mode sets when they are left at None
    "star": dict(restart_from_base=True, steps=40, step_growth=1.2, warmup_steps=100, lr_schedule="constant"),
    "bstar": dict(restart_from_base=False, steps=40, step_growth=1.0, warmup_steps=0, lr_schedule="cosine"),
}


def resolve_mode(args: Args) -> Args:
    return dataclasses.replace(args, **{k: v for k, v in MODES[args.mode].items() if getattr(args, k) is None})


# ------------------------------------------------------------------------------------ ALGO LOGIC
@dataclass
class Example:
    """One SFT example: the hint-free prompt text and the completion's token ids (EOS included)."""
    query: int
    prompt: str
    completion_ids: list[int]
    text: str = ""  # the completion as text (for the step diagnostics)
    hinted: bool = False  # found by rationalization (the hint is not in `prompt`)


@dataclass
class Sample:
    """One scored answer (B-STaR and the monitors)."""
    text: str
    ids: list[int]
    correct: bool
    reward: float  # r = 1[correct] (+ r_prm)


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """L(θ) = −Σ mask · log p_θ / Σ mask over completion tokens only (§2; prompt tokens never enter logp); `num_tokens`:
    the whole batch's completion tokens (all micro-batches and processes), so micro-batch losses sum to its mean."""
    mask = mask.to(logp.dtype)
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    return -(logp * mask).sum() / num_tokens


def star_steps(n: int, s1: int = 40, growth: float = 1.2) -> int:
    """s_n = int(s_1 · g^(n−1)): 40, 48, 57, 69, 82, ... (§4, the code's --exponential_grow)."""
    return int(s1 * growth ** (n - 1))


def n_star(num_selected: int, num_queries: int) -> int:
    """n* = ⌈N/M⌉ (§2; ⌈67500/11500⌉ = 6 for MATH; the released code hard-codes 8, pitfall 4)."""
    return math.ceil(num_selected / max(num_queries, 1))


def balance_scores(n: list[int], n_correct: list[int], nstar: int) -> list[float]:
    """bs_i = min(n'_i/n*, 1) · n'_i/n_i, and 0 when nothing of query i is selected (n_i = 0, §2)."""
    return [0.0 if ni == 0 else min(nc / nstar, 1.0) * nc / ni for ni, nc in zip(n, n_correct)]


def bstar_reward(correct: bool, r_prm: float | None = None) -> float:
    """r = 1[â = a*] ("Answer"), or 1[â = a*] + r_prm ("Answer+PRM"); a wrong answer can pass τ (§7.10)."""
    return float(correct) + (0.0 if r_prm is None else r_prm)


def step_reward(text: str, numbers: list[int]) -> float:
    """r_prm from the exact step checker: +1 if every step is right and grounded, −1 + 2j/m if the first
    wrong step is j (0-based) of m steps, −1 if there is no step (an extension: B-STaR learns its PRM)."""
    report = check_steps(text, numbers)
    return 1.0 if report.all_ok else -1.0 + 2.0 * (report.first_error or 0) / max(len(report.steps), 1)


def prm_min_score(step_logits: torch.Tensor) -> float:
    """r_prm = min over steps of 2σ(logit) − 1 ∈ (−1, 1): the minimum step score (§2, §7.7's clean form)."""
    return float((2 * torch.sigmoid(step_logits.float()) - 1).min())


def select(samples: list[Sample], tau: float) -> list[Sample]:
    """Keep r > τ (strict), deduplicated by the exact output text (§2, §7.9): n_i = len(result)."""
    kept = {}
    for s in samples:
        if s.reward > tau:
            kept.setdefault(s.text, s)
    return list(kept.values())


def balance_terms(groups: list[list[Sample]], tau: float, nstar: int) -> tuple[float, float, float]:
    """(BS, exploration, exploitation) at threshold τ for the answers of one temperature: BS(t, τ) = mean_i bs_i
    over all queries; exploration = mean_i min(n'_i/n*, 1); exploitation = mean of n'_i/n_i where n_i > 0."""
    chosen = [select(g, tau) for g in groups]
    n, n_right = [len(c) for c in chosen], [sum(s.correct for s in c) for c in chosen]
    bs = sum(balance_scores(n, n_right, nstar)) / max(len(groups), 1)
    explore = sum(min(nc / nstar, 1.0) for nc in n_right) / max(len(groups), 1)
    exploit = [nc / ni for ni, nc in zip(n, n_right) if ni]
    return bs, explore, sum(exploit) / len(exploit) if exploit else float("nan")


def balance_score(groups: list[list[Sample]], tau: float, nstar: int) -> float:
    """BS(t, τ) = mean_i bs_i over the queries of `groups` (answers of one temperature)."""
    return balance_terms(groups, tau, nstar)[0]


def search_config(by_temperature: dict[float, list[list[Sample]]], taus, nstar: int) -> tuple[float, float, float]:
    """(t_i, τ_i, BS) = argmax over T × Θ; ties keep the first maximum (lower t, then lower τ; §7.9)."""
    return max(((t, tau, balance_score(by_temperature[t], tau, nstar)) for t in sorted(by_temperature)
                for tau in sorted(taus)), key=lambda c: c[2])  # max keeps the first of equal maxima


_EQUATIONS = re.compile(r"\$([^$]+)\$|<<([^>]+)>>|\\\[(.+?)\\\]"  # the B-STaR code's delimiters
                        r"|(\(?-?\d[\d.\s()]*(?:[-+*/×x÷]\s*\(?\s*-?\d[\d.\s()]*)+=\s*-?\d[\d.,]*)")  # 12 + 7 = 19


def equations(text: str) -> list[str]:
    """Equations in `text`: `$…$`, `<<…>>`, `\\[…\\]` (B-STaR's metric code) and plain `a + b = c`
    (our tasks write no LaTeX), whitespace removed."""
    return [re.sub(r"\s+", "", next(g for g in m.groups() if g)).rstrip(".,") for m in _EQUATIONS.finditer(text)]


def monitor_metrics(groups: list[list[Sample]], s: int) -> dict[str, float]:
    """B-STaR's monitors (§2), averaged over queries: Pass@K (≥ 1 correct), Pass@K-S (≥ S distinct correct),
    Best-of-K (top-1 by reward correct), Reward@K-S (top S by reward all correct), and distinct-equation
    diversity (#unique / #equations over a query's correct answers; mean over queries that have any)."""
    out = {"pass_at_k": 0.0, "pass_at_k_s": 0.0, "best_of_k": 0.0, "reward_at_k_s": 0.0}
    diversity = []
    for g in groups:
        ranked = sorted(g, key=lambda x: -x.reward)  # stable: ties keep sampling order
        out["pass_at_k"] += any(x.correct for x in g)
        out["pass_at_k_s"] += len({x.text for x in g if x.correct}) >= s
        out["best_of_k"] += bool(ranked) and ranked[0].correct
        out["reward_at_k_s"] += len(ranked) >= s and all(x.correct for x in ranked[:s])
        eqs = [e for x in g if x.correct for e in equations(x.text)]
        if eqs:
            diversity.append(len(set(eqs)) / len(eqs))
    out = {k: v / max(len(groups), 1) for k, v in out.items()}
    out["diversity"] = sum(diversity) / len(diversity) if diversity else float("nan")
    return out


# ------------------------------------------------------------------------------------ STaR: Alg. 1 lines 3–6
def question(tokenizer, task, problem, hint_template: str | None = None) -> str:
    """x_i as the chat prompt; with `hint_template`, add_hint(x_i, y_i), the rationalization question. The hint
    is the final answer only, never a reference solution (pitfall 2; countdown's final answer is an equation)."""
    answer = problem.meta.get("solution", problem.answer) if task.mode == "countdown" else problem.answer
    user = problem.prompt if hint_template is None else hint_template.format(prompt=problem.prompt, answer=answer)
    return chat_prompt(tokenizer, user, task.system_prompt)


def decode(lm: LM, prompts: list[str], args: Args, k: int = 1, temperature: float = 0.0,
           desc: str = "greedy") -> list[tuple[str, list[int], bool]]:
    """k answers per prompt from the current policy (temperature 0 = greedy): (text, completion ids
    incl. EOS, ended), the k answers of a prompt adjacent."""
    out, per_call = [], max(1, args.gen_batch_size // k)
    for i in tqdm(range(0, len(prompts), per_call), desc=desc, leave=False, disable=not lm.accelerator.is_main_process):
        if args.token_budget and generated_tokens() * lm.accelerator.num_processes >= args.token_budget:
            break  # --token-budget spent (this process's share: no collective here); the iteration uses what it has
        ro = generate(lm.model, lm.tokenizer, prompts[i:i + per_call], n=k, max_new_tokens=args.max_new_tokens,
                      temperature=max(temperature, 1e-6), greedy=temperature == 0)
        ids = [row[m.bool()].tolist() for row, m in zip(ro.completion_ids.cpu(), ro.completion_mask.cpu())]
        out += list(zip(ro.texts, ids, (~ro.truncated).tolist()))
    return out


def star_collect(lm: LM, task, problems: dict, args: Args) -> tuple[list[Example], dict]:
    """Alg. 1 lines 3–6 on `problems` ({query id: Problem}): D_n ∪ D_n^rat and how many of each.

    An answer counts when it ended and its final answer equals the gold one. Rationalization is asked
    only where the first answer was wrong; what it gets right is stored under the hint-free x_i (pitfall 1)."""
    tok, qs = lm.tokenizer, list(problems)
    # rationale generation: (r̂_i, ŷ_i) ← M_{n−1}(x_i)
    answers = decode(lm, [question(tok, task, problems[q]) for q in qs], args, temperature=args.temperature)
    right = [ended and task.verify(text, problems[q]).correct for q, (text, _, ended) in zip(qs, answers)]
    # D_n = {(x_i, r̂_i, y_i) | ŷ_i = y_i}
    d_n = [Example(q, question(tok, task, problems[q]), ids, text)
           for q, (text, ids, _), ok in zip(qs, answers, right) if ok]
    # rationalization: (r̂_i^rat, ŷ_i^rat) ← M_{n−1}(add_hint(x_i, y_i)) where ŷ_i ≠ y_i
    wrong, d_rat = [q for q, ok in zip(qs, right) if not ok], []
    if args.rationalize and wrong:
        hinted = decode(lm, [question(tok, task, problems[q], args.hint_template) for q in wrong], args,
                        temperature=args.temperature, desc="rationalize")
        # D_n^rat = {(x_i, r̂_i^rat, y_i) | ŷ_i ≠ y_i ∧ ŷ_i^rat = y_i}, x_i without the hint
        d_rat = [Example(q, question(tok, task, problems[q]), ids, text, hinted=True)
                 for q, (text, ids, ended) in zip(wrong, hinted) if ended and task.verify(text, problems[q]).correct]
    return d_n + d_rat, {"solved": len(d_n), "rationalized": len(d_rat)}


def gather(items: list, accelerator) -> list:  # every process's `items`, concatenated
    return gather_object(items) if accelerator.num_processes > 1 else items


def wrong_step_rate(examples: list[Example], task) -> float:
    """Share of kept answers with a wrong, ungrounded or missing step (NaN without step ground truth):
    right answers reached by bad reasoning, the failure the STaR paper saw at temperature > 0."""
    if not examples or task.name != "multistep":
        return float("nan")
    return sum(not check_steps(e.text, task.train[e.query].meta["numbers"]).all_ok for e in examples) / len(examples)


# ------------------------------------------------------------------------------------ B-STaR: reward, search, sampling
class ProcessReward:
    """r_prm(x, ŷ): a sequence-classification model with one logit scores the solution cut after each
    step (steps split at blank lines, B-STaR's format); the reward is the minimum step score (§2)."""

    FORMAT = "# Question\n\n{question}\n\n# Solution\n\n{solution}"  # B-STaR's prompt (§5)

    def __init__(self, name: str, device, batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1).to(device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def __call__(self, problem, solutions: list[str]) -> list[float]:
        texts, owner, logits = [], [], []
        for j, sol in enumerate(solutions):
            steps = [s for s in sol.split("\n\n") if s.strip()] or [sol]
            for m in range(1, len(steps) + 1):
                texts.append(self.FORMAT.format(question=problem.prompt, solution="\n\n".join(steps[:m])))
                owner.append(j)
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 padding_side="right").to(self.device)
            logits.append(self.model(**enc).logits[:, 0].float().cpu())
        logits, owner = (torch.cat(logits) if logits else torch.zeros(0)), torch.tensor(owner)
        return [prm_min_score(logits[owner == j]) for j in range(len(solutions))]


def step_rewards(problem, solutions: list[str]) -> list[float]:  # r_prm of each solution, exact
    return [step_reward(s, problem.meta["numbers"]) for s in solutions]


def process_reward(args: Args, device):
    """r_prm as a function (problem, solutions) -> scores, or None for r = 1[correct] ("Answer")."""
    if args.prm == "none" or (args.prm == "auto" and args.task != "multistep"):
        return None
    return step_rewards if args.prm in ("auto", "steps") else ProcessReward(args.prm, device)


def sample_scored(lm: LM, task, queries: list[int], temperature: float, args: Args, prm,
                  desc: str) -> list[list[Sample]]:
    """K = group_size scored answers per training query (split across processes, gathered in `queries`
    order). Answers that never end are dropped, as B-STaR drops outputs without "# Answer" (§5)."""
    acc, K = lm.accelerator, args.group_size
    mine, groups = queries[acc.process_index::acc.num_processes], []
    answers = decode(lm, [question(lm.tokenizer, task, task.train[q]) for q in mine], args, K, temperature, desc)
    for j, q in enumerate(mine):
        ended = [(text, ids) for text, ids, done in answers[j * K:(j + 1) * K] if done]
        r_prm = prm(task.train[q], [text for text, _ in ended]) if prm else [None] * len(ended)
        group = []
        for (text, ids), r in zip(ended, r_prm):
            correct = task.verify(text, task.train[q]).correct
            group.append(Sample(text, ids, correct, bstar_reward(correct, r)))
        groups.append((q, group))
    found = dict(gather(groups, acc))
    return [found[q] for q in queries]


def search_configuration(lm: LM, task, subset: list[int], args: Args, prm, nstar: int):
    """§3 steps 2–3: K answers per subset query at every t ∈ T from P_{i−1}, then (t_i, τ_i) = argmax
    BS(t, τ) over T × Θ (Θ = {τ} without a process reward: r ∈ {0, 1}, nothing to trade). Returns
    t_i, τ_i, the answers by temperature (the monitors reuse them), the metrics and the BS grid."""
    taus = args.thresholds if prm else (args.threshold,)
    by_t = {t: sample_scored(lm, task, subset, t, args, prm, f"search t={t}") for t in args.temperatures}
    t_i, tau_i, bs = search_config(by_t, taus, nstar)
    grid = {t: {tau: balance_terms(groups, tau, nstar) for tau in taus} for t, groups in by_t.items()}
    _, explore, exploit = grid[t_i][tau_i]
    metrics = {"bstar/search_balance_score": bs, "bstar/exploration": explore, "bstar/exploitation": exploit,
               "bstar/threshold_search": float(prm is not None)}
    for t, row in grid.items():  # the best BS at each temperature
        metrics[f"bstar/balance_score_t{t}"] = max(v[0] for v in row.values())
    return t_i, tau_i, by_t, metrics, grid


def bstar_collect(lm: LM, task, args: Args, prm, t: float, tau: float) -> tuple[list[Example], list[list[Sample]]]:
    """§3 step 4: K answers per training query at t_i; keep r > τ_i, deduplicated (no rationalization)."""
    groups = sample_scored(lm, task, list(range(len(task.train))), t, args, prm, f"sample t={t}")
    examples = [Example(q, question(lm.tokenizer, task, task.train[q]), s.ids, s.text)
                for q, g in enumerate(groups) for s in select(g, tau)]
    return examples, groups


# ------------------------------------------------------------------------------------ fine-tuning (Alg. 1 line 7)
def build_batch(tokenizer, examples: list[Example], device):
    """Prompts left-padded (as `generate` lays them out), completions right-padded; the mask is 1 on
    exactly the completion tokens. Explicit prompt masking, not the code's "after the last ':'" (§5)."""
    enc = tokenizer([e.prompt for e in examples], return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    width = max(len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width)
    for row, e in enumerate(examples):
        ids[row, :len(e.completion_ids)] = torch.tensor(e.completion_ids)
        mask[row, :len(e.completion_ids)] = 1
    return enc.input_ids.to(device), enc.attention_mask.to(device), ids.to(device), mask.to(device)


def initial_state(params: list[torch.Tensor], optimizer, scheduler) -> dict:
    """θ_0 (a CPU copy of the trainable weights), a fresh optimizer and a fresh LR schedule."""
    return {"params": [p.detach().cpu().clone() for p in params],
            "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict())}


def begin_iteration(params, optimizer, scheduler, base: dict, restart: bool) -> None:
    """STaR (Alg. 1 line 7): reset to the base weights, a fresh Adam and a fresh warm-up. B-STaR (§3 step
    5): continue from P_{i−1} with its Adam moments and its place in the LR schedule (do nothing)."""
    if restart:
        with torch.no_grad():
            for p, b in zip(params, base["params"]):
                p.copy_(b)
        optimizer.load_state_dict(copy.deepcopy(base["optimizer"]))
        scheduler.load_state_dict(copy.deepcopy(base["scheduler"]))


def distance_from(params, base: dict) -> float:
    """‖θ − θ_0‖₂ over the trainable weights."""
    return math.sqrt(sum(float(((p.detach().cpu() - b) ** 2).sum()) for p, b in zip(params, base["params"])))


def lr_lambda(args: Args, total_steps: int):
    def factor(s: int) -> float:
        if s < args.warmup_steps:
            return (s + 1) / args.warmup_steps
        if args.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - args.warmup_steps) / max(total_steps - args.warmup_steps, 1))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def finetune(lm: LM, examples: list[Example], steps: int, args: Args, generator: torch.Generator) -> dict:
    """`steps` SFT steps of `batch_size` examples (epoch-wise shuffled) with the loss of §2."""
    model, acc, world, rank = lm.model, lm.accelerator, lm.accelerator.num_processes, lm.accelerator.process_index
    order, sums = [], {"loss": 0.0, "grad_norm": 0.0, "tokens": 0}
    model.train()
    for _ in tqdm(range(steps), desc="sft", leave=False, disable=not acc.is_main_process):
        while len(order) < args.batch_size:  # every process draws the same global batch
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:args.batch_size]], order[args.batch_size:]
        num_tokens = sum(len(e.completion_ids) for e in batch)
        mine = batch[rank::world]
        chunks = [mine[j:j + args.micro_batch_size] for j in range(0, len(mine), args.micro_batch_size)]
        for k, chunk in enumerate(chunks):
            with nullcontext() if k == len(chunks) - 1 else acc.no_sync(model):
                p_ids, p_mask, c_ids, c_mask = build_batch(lm.tokenizer, chunk, acc.device)
                logp = token_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=1.0)
                loss = sft_loss(logp, c_mask, num_tokens)
                acc.backward(loss * world)  # DDP averages over processes; the normaliser is global
            sums["loss"] += acc.reduce(loss.detach(), reduction="sum").item() / steps
        sums["grad_norm"] += float(acc.clip_grad_norm_(lm.params, args.max_grad_norm)) / steps
        sums["tokens"] += num_tokens
        lm.optimizer.step()
        lm.scheduler.step()
        lm.optimizer.zero_grad(set_to_none=True)
    return sums


# ------------------------------------------------------------------------------------ evaluation and selection
def evaluate_iteration(run: Run, lm: LM, it: int, args: Args, best: dict) -> dict:
    """§3 step 6: greedy accuracy on dev picks the best iteration (its weights go to `best/`) and drives
    --patience; test accuracy is logged at the same point and never used to choose. Returns the test result."""
    dev = run.evaluate(lm, it, args.max_new_tokens, problems=run.task.dev, split="dev")
    test = run.evaluate(lm, it, args.max_new_tokens)
    if dev["accuracy"] > best["dev_accuracy"]:
        best.update(iteration=it, dev_accuracy=dev["accuracy"], test_accuracy=test["accuracy"])
        if run.accelerator.is_main_process:
            lm.policy.save_pretrained(run.dir / "best")
            lm.tokenizer.save_pretrained(run.dir / "best")
    run.logger.log({f"star/best_{k}": v for k, v in best.items()}, it)
    return test


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("star", args, presets=resolve_mode, label=args.mode)  # flags, resume, task, accelerator, run dir
    args, task, acc, log = run.args, run.task, run.accelerator, run.log
    schedule = [star_steps(n, args.steps, args.step_growth) for n in range(1, args.iterations + 1)]  # s_n
    lm = run.setup_lm(lr_lambda=lr_lambda(args, sum(schedule)), restore=False)  # Adam, no weight decay
    base = initial_state(lm.params, lm.optimizer, lm.scheduler)  # M: STaR restarts from it (before any resume)
    state = run.restore(lm)  # a new run: each process reseeded with seed + rank
    prm, M = process_reward(args, acc.device), len(task.train)
    nstar = n_star(args.num_selected or math.ceil(M * 67500 / 11500), M)  # the paper's N/M unless --num-selected
    it, best = state.get("iteration", 0), state.get("best", {"iteration": 0, "dev_accuracy": -1.0, "test_accuracy": -1.0})
    before = last = evaluate_iteration(run, lm, 0, args, best) if it == 0 else None
    if args.mode == "bstar":
        log(f"bstar: n* = {nstar}; " + (f"r = 1[correct] + r_prm ({args.prm}), τ searched" if prm else
                                       f"no process reward, so r = 1[correct] and τ = {args.threshold}"))
    try:
        for n in range(it + 1, args.iterations + 1):
            if not run.budget_left():  # --token-budget: the iteration that spent it was the last (see `decode`)
                break
            t0, metrics = time.time(), {}
            subset = sorted(random.Random(f"{args.seed}/{n}").sample(range(M), min(args.subset_size, M)))

            # ---- B-STaR only (§3 steps 2–3): (t_n, τ_n) = argmax_{t,τ} BS(t, τ) on the subset, from M_{n−1}
            if args.mode == "bstar":
                t_n, tau_n, by_t, metrics, grid = search_configuration(lm, task, subset, args, prm, nstar)
                monitor = by_t.get(args.monitor_temperature)
                if acc.is_main_process:  # BS, exploration, exploitation at every (t, τ)
                    with open(run.dir / "bstar_search.jsonl", "a") as f:
                        f.write(json.dumps({"iteration": n, "t": t_n, "tau": tau_n, "grid": grid}) + "\n")
            else:  # STaR: greedy (r ∈ {0, 1}, kept iff correct)
                t_n, tau_n, monitor = args.temperature, args.threshold, None
            if monitor is None and subset:  # Pass@K and friends, at one temperature in both modes
                with uncounted():  # a diagnostic: not part of the --token-budget, nor cut short by it
                    free = dataclasses.replace(args, token_budget=0)
                    monitor = sample_scored(lm, task, subset, args.monitor_temperature, free, prm, "monitor")
            if monitor is not None:
                metrics |= {f"star/{k}": v for k, v in monitor_metrics(monitor, args.pass_s).items()}

            # ---- Alg. 1 lines 3–6: generate rationales, keep the right ones, rationalize the rest
            if args.mode == "star":
                mine = {q: task.train[q] for q in range(M)[acc.process_index::acc.num_processes]}
                examples, counts = star_collect(lm, task, mine, args)
                examples = sorted(gather(examples, acc), key=lambda e: e.query)
                counts = {k: sum(c[k] for c in gather([counts], acc)) for k in counts}
                metrics |= {"train/accuracy": counts["solved"] / M, "star/rationalized": counts["rationalized"],
                            "star/rationalized_wrong_step": wrong_step_rate([e for e in examples if e.hinted], task)}
            else:  # B-STaR §3 step 4: K answers per query at t_n, keep r > τ_n (no rationalization)
                examples, groups = bstar_collect(lm, task, args, prm, t_n, tau_n)
                metrics |= {"train/accuracy": sum(s.correct for g in groups for s in g) / (M * args.group_size),
                            "star/balance_score": balance_score(groups, tau_n, nstar), "star/rationalized": 0}
            t_gen = time.time() - t0

            # ---- Alg. 1 line 7: M_n ← train(M, D_n ∪ D_n^rat): STaR from the base, B-STaR from M_{n−1} (§3 step 5)
            begin_iteration(lm.params, lm.optimizer, lm.scheduler, base, args.restart_from_base)
            init_dist, steps, t1 = distance_from(lm.params, base), schedule[n - 1] if examples else 0, time.time()
            sums = finetune(lm, examples, steps, args, torch.Generator().manual_seed(args.seed * 100_003 + n))
            t_update = time.time() - t1
            metrics |= {"star/temperature": t_n, "star/threshold": tau_n, "star/selected": len(examples),
                        "star/queries_covered": len({e.query for e in examples}) / M, "star/n_star": nstar,
                        "star/kept_wrong_step": wrong_step_rate(examples, task), "star/init_dist": init_dist,
                        "star/dist_from_base": distance_from(lm.params, base), "train/steps": steps, "train/loss": sums["loss"],
                        "train/grad_norm": sums["grad_norm"], "train/lr": lm.scheduler.get_last_lr()[0],
                        "train/scheduler_step": lm.scheduler.last_epoch, "perf/gen_s": t_gen, "perf/update_s": t_update,
                        "perf/iter_s": time.time() - t0, "perf/tokens_per_s": sums["tokens"] / max(t_update, 1e-9)}
            run.logger.log(metrics, n)
            log(f"iteration {n}: t={t_n} τ={tau_n} selected {len(examples)} ({metrics['star/rationalized']} "
                f"rationalized), {steps} SFT steps, loss {sums['loss']:.3f}")

            # ---- evaluate, keep the best iteration, stop when it has not improved for --patience iterations
            it = n
            last = evaluate_iteration(run, lm, it, args, best)
            run.save(lm, iteration=it, best=best)
            if args.patience and it - best["iteration"] >= args.patience:
                log(f"no better dev accuracy for {args.patience} iterations: stopping (§3 step 6)")
                break
    except KeyboardInterrupt:
        log(f"\ninterrupted in iteration {it + 1}; --resume {run.dir} redoes it from the iteration-{it} checkpoint")
        raise
    finally:
        run.close()
    log(f"best iteration on dev: {best['iteration']} (dev {best['dev_accuracy']:.3f}, test {best['test_accuracy']:.3f}; "
        f"weights in {run.dir / 'best'})")
    return run.summary(lm, before, last) | {"best": best}


if __name__ == "__main__":
    main(cli(Args))

"""STaR — Self-Taught Reasoner (default), and B-STaR (`--mode bstar`), its balanced online variant.

Papers: Zelikman, Wu, Mu, Goodman, "STaR: Bootstrapping Reasoning With Reasoning", arXiv:2203.14465
(Alg. 1, Eqs. 1–2); Zeng et al., "B-STaR: Monitoring and Balancing Exploration and Exploitation in
Self-Taught Reasoners", arXiv:2412.17256 (§2.3, §3, Alg. 1). Spec: shared/papers/star.md (§ below).

STaR: each iteration the model writes a rationale + answer for every training question (greedy).
Right answers are kept. For wrong ones it is asked again with the gold answer as a hint
("rationalization"); right rationalized answers are kept *as if no hint had been given*. The BASE
model is then fine-tuned on the union, from scratch, for a growing number of steps. Repeat.
B-STaR: online rejection fine-tuning that never restarts. Before each iteration it picks the
sampling temperature t (and, with a process reward model, the reward threshold τ) that maximise the
balance score on a query subset, samples K answers per query at t, keeps r > τ, and trains on.

    J(M)  = Σ_i E_{(r̂,ŷ)~p_M(·|x_i)} 1[ŷ_i = y_i]                      STaR Eq. 1 (0/1-reward policy gradient)
    L(θ)  = −Σ_{(x,r,y) ∈ D_n ∪ D_n^rat} log p_θ(r, y | x)             completion tokens only, x hint-free (§2)
    s_n   = int(40 · 1.2^(n−1))                                        SFT steps in STaR iteration n (§4)
    r     = 1[â = a*]  (+ r_prm = min over steps of 2σ(logit) − 1)      B-STaR reward; keep iff r > τ (§2)
    bs_i  = min(n'_i / n*, 1) · n'_i / n_i   (0 if n_i = 0),  n* = ⌈N/M⌉ B-STaR balance score (§2)
    (t_i, τ_i) = argmax_{t ∈ T, τ ∈ Θ} mean_i bs_i                      on a query subset, with P_{i−1} (§3)
n_i: selected distinct answers of query i; n'_i: distinct correct ones; N samples wanted per iteration
over M queries.

Choices and simplifications (spec §7 lists the code/paper differences): a chat prompt instead of
STaR's ten few-shot exemplars (the instruct model needs no format demonstration), so the hint is a
sentence appended to the question and gives the final answer only (pitfall 2); answers that never
end within --max-new-tokens are dropped (as B-STaR drops outputs without "# Answer"); τ is searched
on the subset as in the paper (not on the full set as in the code); no per-query cap and no gold
solutions added to the candidates (code-only, §7.5–7.6); "dev" accuracy is greedy accuracy on the
task's held-out split; P_0 is the instruct model (no SFT epoch of our own).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/star.py` finds `shared`

import copy
import dataclasses
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
from shared.evaluation import evaluate
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.run import Run
from shared.sampling import generate


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --task, --lr, ...) come from shared/args.py
    iterations: int = 3
    """outer iterations (STaR n = 1..N_iter; B-STaR i = 1..I, 9 in the paper)"""
    patience: int = 0
    """stop after this many iterations without a new best dev accuracy (0 = run every iteration)"""
    n_train: int = 1000
    """training questions, all answered every iteration (M)"""
    n_test: int = 200
    """held-out questions: the dev set, greedy accuracy after every iteration"""
    max_new_tokens: int = 48
    """generation budget per answer (rationale + answer); also used for the dev evaluation"""
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
    """B-STaR grid Θ of reward thresholds τ, searched only with --prm (§4)"""
    threshold: float = 0.0
    """B-STaR τ without --prm: r ∈ {0, 1}, so any τ in [0, 1) keeps exactly the right answers"""
    num_selected: int | None = None
    """N: answers B-STaR wants per iteration, n* = ⌈N/M⌉ (None: the paper's 67500 per 11500 queries at K = 64, scaled to K)"""
    prm: str | None = None
    """B-STaR: a process reward model (HF sequence-classification checkpoint, one logit) scoring each step prefix"""

    RULES: ClassVar[dict[str, str]] = {
        "iterations": ">= 1", "patience": ">= 0", "steps": ">= 0", "step_growth": "> 0", "batch_size": "> 0",
        "micro_batch_size": "> 0", "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "max_grad_norm": "> 0",
        "gen_batch_size": "> 0", "group_size": ">= 1", "pass_s": ">= 1", "subset_size": ">= 0",
        "monitor_temperature": ">= 0", "temperatures": "> 0", "thresholds": "[-1, 2]", "threshold": "[-1, 2]",
        "num_selected": ">= 1"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # SFT examples are split across processes

    def check(self) -> None:
        super().check()
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


@dataclass
class Sample:
    """One scored answer (B-STaR and the monitors)."""
    text: str
    ids: list[int]
    correct: bool
    reward: float


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """L(θ) = −Σ mask · log p_θ / Σ mask over completion tokens only (§2; prompt tokens never enter logp).

    `num_tokens`: the completion tokens of the whole batch (all micro-batches and processes), so summing
    micro-batch losses gives the batch's token mean."""
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


def prm_min_score(step_logits: torch.Tensor) -> float:
    """r_prm = min over steps of 2σ(logit) − 1 ∈ (−1, 1): the minimum step score (§2, §7.7's clean form)."""
    return float((2 * torch.sigmoid(step_logits.float()) - 1).min())


def select(samples: list[Sample], tau: float) -> list[Sample]:
    """Keep r > τ (strict), deduplicated by the exact output text (§2, §7.9): n_i = len(result)."""
    kept, seen = [], set()
    for s in samples:
        if s.reward > tau and s.text not in seen:
            seen.add(s.text)
            kept.append(s)
    return kept


def balance_score(groups: list[list[Sample]], tau: float, nstar: int) -> float:
    """BS(t, τ) = mean_i bs_i over the queries of `groups` (answers of one temperature)."""
    chosen = [select(g, tau) for g in groups]
    return sum(balance_scores([len(c) for c in chosen], [sum(s.correct for s in c) for c in chosen], nstar)) / max(len(groups), 1)


def search_config(by_temperature: dict[float, list[list[Sample]]], taus, nstar: int) -> tuple[float, float, float]:
    """(t_i, τ_i, BS) = argmax over T × Θ; ties keep the first maximum (lower t, then lower τ; §7.9)."""
    best = None
    for t in sorted(by_temperature):
        for tau in sorted(taus):
            bs = balance_score(by_temperature[t], tau, nstar)
            if best is None or bs > best[2]:
                best = (t, tau, bs)
    return best


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


def star_collect(problems: dict, prompt_fn, hint_fn, generate_fn, verify_fn, rationalize: bool = True):
    """STaR Alg. 1 lines 2–4 on `problems` ({query id: Problem}).

    generate_fn(prompts) -> [(text, ids, ended)] decodes greedily; verify_fn(text, problem) -> bool.
    Rationalization (hint_fn's prompt) is asked only for the questions answered wrongly; what it gets
    right is stored with the hint-free prompt_fn(problem) (§2, pitfall 1). Returns (D_n ∪ D_n^rat, counts)."""
    qs = list(problems)
    first = generate_fn([prompt_fn(problems[q]) for q in qs])
    ok = [ended and verify_fn(text, problems[q]) for q, (text, _, ended) in zip(qs, first)]
    examples = [Example(q, prompt_fn(problems[q]), ids) for q, (_, ids, _), good in zip(qs, first, ok) if good]
    failed = [q for q, good in zip(qs, ok) if not good]
    n_rat = 0
    if rationalize and failed:
        for q, (text, ids, ended) in zip(failed, generate_fn([hint_fn(problems[q]) for q in failed])):
            if ended and verify_fn(text, problems[q]):
                examples.append(Example(q, prompt_fn(problems[q]), ids))  # x without the hint
                n_rat += 1
    return examples, {"solved": sum(ok), "rationalized": n_rat}


def hint_question(problem, template: str, task_mode: str) -> str:
    """The rationalization question: the hint is the final answer only, never a reference solution
    (pitfall 2; for countdown the final answer is an equation, so the stored solution is it)."""
    answer = problem.meta.get("solution", problem.answer) if task_mode == "countdown" else problem.answer
    return template.format(prompt=problem.prompt, answer=answer)


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
    """STaR (Alg. 1 line 5): reset to the base weights, a fresh Adam and a fresh warm-up. B-STaR (§3 step
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


def finetune(model, tokenizer, examples: list[Example], optimizer, scheduler, steps: int, args: Args,
             accelerator, generator: torch.Generator) -> dict:
    """`steps` SFT steps of `batch_size` examples (epoch-wise shuffled) with the loss of §2."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    params = [p for p in model.parameters() if p.requires_grad]
    order, sums = [], {"loss": 0.0, "grad_norm": 0.0, "tokens": 0}
    model.train()
    for _ in tqdm(range(steps), desc="sft", leave=False, disable=not accelerator.is_main_process):
        while len(order) < args.batch_size:  # every process draws the same global batch
            order += torch.randperm(len(examples), generator=generator).tolist()
        batch, order = [examples[i] for i in order[:args.batch_size]], order[args.batch_size:]
        num_tokens = sum(len(e.completion_ids) for e in batch)
        mine = batch[rank::world]
        chunks = [mine[j:j + args.micro_batch_size] for j in range(0, len(mine), args.micro_batch_size)]
        for k, chunk in enumerate(chunks):
            with nullcontext() if k == len(chunks) - 1 else accelerator.no_sync(model):
                p_ids, p_mask, c_ids, c_mask = build_batch(tokenizer, chunk, device)
                logp = token_logprobs(model, p_ids, p_mask, c_ids, c_mask, temperature=1.0)
                loss = sft_loss(logp, c_mask, num_tokens)
                accelerator.backward(loss * world)  # DDP averages over processes; the normaliser is global
            sums["loss"] += accelerator.reduce(loss.detach(), reduction="sum").item() / steps
        sums["grad_norm"] += float(accelerator.clip_grad_norm_(params, args.max_grad_norm)) / steps
        sums["tokens"] += num_tokens
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return sums


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
    def __call__(self, question: str, solutions: list[str]) -> list[float]:
        texts, owner = [], []
        for j, sol in enumerate(solutions):
            steps = [s for s in sol.split("\n\n") if s.strip()] or [sol]
            for m in range(1, len(steps) + 1):
                texts.append(self.FORMAT.format(question=question, solution="\n\n".join(steps[:m])))
                owner.append(j)
        logits = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 padding_side="right").to(self.device)
            logits.append(self.model(**enc).logits[:, 0].float().cpu())
        logits, owner = (torch.cat(logits) if logits else torch.zeros(0)), torch.tensor(owner)
        return [prm_min_score(logits[owner == j]) for j in range(len(solutions))]


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("star", args, presets=resolve_mode, label=args.mode)  # flags, resume, task, accelerator, run dir
    args, accelerator, log, run_dir, task = run.args, run.accelerator, run.log, run.dir, run.task
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    step_of = lambda n: star_steps(n, args.steps, args.step_growth)  # noqa: E731
    total_sft_steps = sum(map(step_of, range(1, args.iterations + 1)))
    lm = run.setup_lm(lr_lambda=lr_lambda(args, total_sft_steps), restore=False)  # STaR: Adam, no weight decay
    model, tokenizer, optimizer, scheduler, params = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler, lm.params
    base = initial_state(params, optimizer, scheduler)  # captured before any checkpoint is loaded
    prm = ProcessReward(args.prm, device) if args.prm else None
    M, K = len(task.train), args.group_size
    nstar = n_star(args.num_selected or round(M * K * 67500 / (11500 * 64)), M)

    state = run.restore(lm)  # a new run: each process reseeded with seed + rank
    it, best = state.get("iteration", 0), state.get("best", {"accuracy": -1.0, "iteration": 0})

    prompt_of = lambda p: chat_prompt(tokenizer, p.prompt, task.system_prompt)  # noqa: E731  the context x
    hint_of = lambda p: chat_prompt(tokenizer, hint_question(p, args.hint_template, task.mode), task.system_prompt)  # noqa: E731
    verify = lambda text, p: task.verify(text, p).correct  # noqa: E731

    def generate_fn(prompts, k=1, temperature=0.0, desc="greedy"):
        """[(text, completion ids incl. EOS, ended)] for k answers per prompt (temperature 0 = greedy)."""
        out, per_call = [], max(1, args.gen_batch_size // k)
        for i in tqdm(range(0, len(prompts), per_call), desc=desc, leave=False, disable=not accelerator.is_main_process):
            ro = generate(model, tokenizer, prompts[i:i + per_call], n=k, max_new_tokens=args.max_new_tokens,
                          temperature=max(temperature, 1e-6), greedy=temperature == 0)
            ids = [row[m.bool()].tolist() for row, m in zip(ro.completion_ids.cpu(), ro.completion_mask.cpu())]
            out += [(text, i_, not tr) for text, i_, tr in zip(ro.texts, ids, ro.truncated.tolist())]
        return out

    def sample_scored(queries: list[int], temperature: float, desc: str) -> list[list[Sample]]:
        """K scored answers for each query (split across processes, gathered in `queries` order)."""
        mine = queries[rank::world]
        outs = generate_fn([prompt_of(task.train[q]) for q in mine], K, temperature, desc)
        pairs = []
        for j, q in enumerate(mine):
            ended = [(text, ids) for text, ids, e in outs[j * K:(j + 1) * K] if e]  # never-ending answers dropped (§5)
            r_prm = prm(task.train[q].prompt, [t for t, _ in ended]) if prm else [None] * len(ended)
            pairs.append((q, [Sample(t, ids, c := verify(t, task.train[q]), bstar_reward(c, r)) for (t, ids), r in zip(ended, r_prm)]))
        found = dict(gather_object(pairs) if world > 1 else pairs)
        return [found[q] for q in queries]

    def run_eval():
        t = time.time()
        res = evaluate(model, tokenizer, task, task.test, args.max_new_tokens, batch_size=args.gen_batch_size,
                       accelerator=accelerator)
        if res["accuracy"] > best["accuracy"]:  # keep the best iteration (§3 step 6)
            best.update(accuracy=res["accuracy"], iteration=it)
            if accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(run_dir / "best")
                tokenizer.save_pretrained(run_dir / "best")
        run.logger.log({f"eval/{k}": v for k, v in res.items()} | {"star/best_accuracy": best["accuracy"],
                   "star/best_iteration": best["iteration"], "perf/eval_s": time.time() - t}, it)
        log(f"iteration {it}: dev greedy accuracy {res['accuracy']:.3f} on {len(task.test)} questions")
        return res

    def checkpoint():
        run.save(lm, iteration=it, best=best)

    before = run_eval() if it == 0 else None
    last_eval, stale = before, 0
    if args.mode == "bstar" and prm is None:
        log(f"bstar: no --prm, so r = 1[correct] and the threshold search is skipped (τ = {args.threshold})")
    bar = tqdm(total=args.iterations, initial=it, desc=args.mode, disable=not accelerator.is_main_process)
    try:
        while it < args.iterations:
            n, t0, metrics = it + 1, time.time(), {}
            model.eval()
            subset = sorted(random.Random(f"{args.seed}/{n}").sample(range(M), min(args.subset_size, M)))
            # ---- B-STaR §3 steps 2–3: sample the subset at every t, pick (t_i, τ_i) = argmax BS
            if args.mode == "bstar":
                taus = args.thresholds if prm else (args.threshold,)  # no PRM: r ∈ {0, 1}, nothing to search
                by_t = {t: sample_scored(subset, t, f"search t={t}") for t in args.temperatures}
                t_i, tau_i, bs = search_config(by_t, taus, nstar)
                metrics |= {"bstar/search_balance_score": bs, "bstar/threshold_search": float(prm is not None)}
                for t, groups in by_t.items():  # the best BS at each temperature
                    metrics[f"bstar/balance_score_t{t}"] = max(balance_score(groups, tau, nstar) for tau in taus)
                monitor = by_t.get(args.monitor_temperature)
            else:
                t_i, tau_i, monitor = args.temperature, args.threshold, None  # greedy by default; r ∈ {0, 1} kept iff correct
            if monitor is None and subset:  # Pass@K and friends, at one temperature in both modes
                monitor = sample_scored(subset, args.monitor_temperature, "monitor")
            if monitor is not None:
                metrics |= {f"star/{k}": v for k, v in monitor_metrics(monitor, args.pass_s).items()}

            # ---- build this iteration's training set
            if args.mode == "star":  # Alg. 1 lines 2–4: greedy answers, then rationalization
                mine = {q: task.train[q] for q in range(M)[rank::world]}
                examples, counts = star_collect(mine, prompt_of, hint_of, lambda ps: generate_fn(ps, 1, t_i), verify,
                                               args.rationalize)
                gathered = gather_object([(examples, counts)]) if world > 1 else [(examples, counts)]
                examples = sorted((e for ex, _ in gathered for e in ex), key=lambda e: e.query)
                solved, n_rat = (sum(c[key] for _, c in gathered) for key in ("solved", "rationalized"))
                metrics |= {"train/accuracy": solved / M, "star/rationalized": n_rat}
                chosen = [1 if q in {e.query for e in examples} else 0 for q in range(M)]  # ≤ 1 example per query
                metrics["star/balance_score"] = sum(balance_scores(chosen, chosen, nstar)) / M
            else:  # §3 step 4: K answers per query at t_i, keep r > τ_i (deduplicated)
                groups = sample_scored(list(range(M)), t_i, f"sample t={t_i}")
                examples = [Example(q, prompt_of(task.train[q]), s.ids) for q, g in enumerate(groups) for s in select(g, tau_i)]
                metrics |= {"train/accuracy": sum(s.correct for g in groups for s in g) / (M * K),
                            "star/balance_score": balance_score(groups, tau_i, nstar), "star/rationalized": 0}
            t_gen = time.time() - t0

            # ---- update: STaR restarts from the base weights (Alg. 1 line 5), B-STaR continues (§3 step 5)
            begin_iteration(params, optimizer, scheduler, base, args.restart_from_base)
            init_dist, steps = distance_from(params, base), step_of(n) if examples else 0
            t1 = time.time()
            gen = torch.Generator().manual_seed(args.seed * 100_003 + n)
            sums = finetune(model, tokenizer, examples, optimizer, scheduler, steps, args, accelerator, gen)
            t_update = time.time() - t1
            it += 1
            metrics |= {"star/temperature": t_i, "star/threshold": tau_i, "star/selected": len(examples),
                        "star/queries_covered": len({e.query for e in examples}) / M, "star/n_star": nstar,
                        "star/init_dist": init_dist, "star/dist_from_base": distance_from(params, base),
                        "train/steps": steps, "train/loss": sums["loss"], "train/grad_norm": sums["grad_norm"],
                        "train/lr": scheduler.get_last_lr()[0], "train/scheduler_step": scheduler.last_epoch,
                        "perf/gen_s": t_gen, "perf/update_s": t_update, "perf/iter_s": time.time() - t0,
                        "perf/tokens_per_s": sums["tokens"] / max(t_update, 1e-9)}
            run.logger.log(metrics, it)
            log(f"iteration {it}: t={t_i} τ={tau_i} selected {len(examples)} ({metrics['star/rationalized']} "
                f"rationalized), {steps} SFT steps, loss {sums['loss']:.3f}")
            last_eval = run_eval()
            checkpoint()
            bar.update(1)
            bar.set_postfix(dev=f"{last_eval['accuracy']:.3f}", selected=len(examples))
            stale = 0 if best["iteration"] == it else stale + 1
            if args.patience and stale >= args.patience:
                log(f"dev accuracy has not improved for {stale} iterations: stopping (§3 step 6)")
                break
    except KeyboardInterrupt:
        log(f"\ninterrupted in iteration {it + 1}; --resume {run_dir} redoes it from the iteration-{it} checkpoint")
        raise
    finally:
        bar.close()
        run.close()
    log(f"best dev accuracy {best['accuracy']:.3f} at iteration {best['iteration']} (weights in {run_dir / 'best'})")
    log(f"run directory: {run_dir}")
    return {"run_dir": str(run_dir), "before": before, "after": last_eval, "best": best,
            "policy": accelerator.unwrap_model(model)}


if __name__ == "__main__":
    main(cli(Args))

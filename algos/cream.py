"""CREAM — Consistency Regularized Self-Rewarding Language Models, with the SRLM and C = 1 baselines.

Paper: Wang et al., "CREAM: Consistency Regularized Self-Rewarding Language Models", ICLR 2025,
arXiv:2410.12735 (official code Raibows/CREAM). Baseline: Yuan et al., "Self-Rewarding Language
Models", arXiv:2401.10020 (SRLM, `--judge`). Spec: shared/papers/cream.md (§ below).

The policy is its own reward model. After a seed SFT stage, every iteration samples N answers per
prompt from M_t and scores them with the DPO implicit reward of M_t against its predecessor M_{t−1};
the best and the worst answer form a preference pair. The same answers are also ranked with the
previous iteration's reward (M_{t−1} against M_{t−2}); the agreement of the two rankings, Kendall τ
rescaled to [0, 1], is a consistency rate C that becomes the soft label of the next DPO round: when
the two rewarders disagree, the loss pulls the pair towards "no preference".

    r_t(x, y)  = Σ_i log π_{M_t}(y_i | x, y_<i) − Σ_i log π_{M_{t−1}}(y_i | x, y_<i)      t ≥ 1 (§2)
    r_0(x, y)  = (1/|y|) Σ_i log π_{M_0}(y_i | x, y_<i)          the base model has no predecessor
    C_x        = (τ(rank r_t, rank r_{t−1}) + 1) / 2,  ranks ordinal (ties by answer index)
    y+, y−     = argmax_i r_t(x, y_i), argmin_i r_t(x, y_i)       (prompt dropped when y+ = y−)
    Δ          = [log πθ(y+|x) − log π_{M_t}(y+|x)] − [log πθ(y−|x) − log π_{M_t}(y−|x)]
    L(θ)       = E[ C · (−log σ(βΔ)) + (1 − C) · (−log σ(−βΔ)) ]                 (§2; C = 1: DPO)
(§ = the spec's sections: the paper's own equation numbers could not be checked, only its abstract and
the released code were readable.)
C is the dataset mean C̄ over the pairs (`--consistency avg`, the paper's method) or each pair's own
C_x (`dyn`); `off` is the ablation C = 1 (plain DPO on the same implicitly rewarded pairs). `--judge`
is the paper's SRLM baseline: the same model scores its answers with Yuan et al.'s additive 5-point
LLM-as-judge prompt, and the pairs are trained with plain DPO.

Choices and simplifications (README's CREAM section gives the reasons):
- The seed set D_S is the task's first `n_seed` training problems with their reference solutions
  (OASST1 in the paper); the iterations' prompts D_U^t are the next, disjoint blocks of
  `prompts_per_iteration` training problems. M_0 is the instruct model.
- Rewards score the response tokens and the end-of-turn token only (the code also scores the
  assistant header, which cancels in r_t for t ≥ 1 but enters M_0's mean).
- Answers that never end within --max-new-tokens get no reward: they are left out of both rankings
  (a prompt with fewer than 2 ended answers is skipped); `--score-truncated` ranks them as the code
  does. Rates are keyed by prompt, never zipped (the released code's zip over a set misattaches C
  after a skipped prompt, §7). The code's filter of pairs shorter than 5 tokens is not applied.
- Each stage (SFT, each iteration) is one fresh AdamW run with a warm-up ratio and cosine decay, as a
  separate Trainer run in the code. The SRLM judge samples `judge_samples` verdicts per answer and
  averages the parsed scores (Yuan et al. use 3); SRLM's EFT judge-training data is not used.
Runs on one process or several (`torchrun`, `accelerate launch`): prompts, answers, rewards and the
pairs of each batch are split across processes, and every process ends with the same weights.
`--token-budget` counts the sampled answers and the SRLM judge's verdicts (the seed SFT generates nothing). Once
it is spent, no more are sampled: the iteration pairs up the prompts whose answers (and verdicts) are complete,
trains M_{t+1} on them, evaluates and saves it, and the run ends.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/cream.py` finds `shared`

import dataclasses
import math
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from shared.args import LMArgs, cli, require
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.rollouts import rollout_logprobs
from shared.run import Run
from shared.sampling import cat_rollouts, encode_prompts, generate


@dataclass
class Args(LMArgs):  # the experiment flags (--model, --task, --lr, ...) come from shared/args.py
    """CREAM (arXiv:2410.12735): seed SFT, then self-rewarding DPO iterations regularised by the consistency of
    consecutive implicit-reward rankings; `--consistency off` and `--judge` are the C = 1 and SRLM baselines.
    One process or several (torchrun / accelerate launch): prompts and pairs are split across processes."""

    task: str = "multistep"
    """`multistep` (reference solutions step by step: the seed SFT set), `arith`, `countdown` or an HF task"""
    n_train: int = 1000
    """training problems: the seed set first, then one disjoint block of prompts per iteration"""
    n_dev: int = 0
    """dev problems: CREAM selects no model and stops nothing early (every M_t is reported), so none by default"""
    max_new_tokens: int = 48
    """generation budget per answer (768 in the paper); also used for the held-out evaluation"""
    temperature: float = 0.8
    """sampling temperature of the N answers (paper 0.8); rewards and losses use the model's own T = 1"""
    lr: float = 1e-5
    """DPO learning rate (paper 1e-6 at 7–8B)"""

    # ---- algorithm
    iterations: int = 3
    """T: self-rewarding DPO iterations after SFT, M_1 → M_{T+1} (paper 3: M_2, M_3, M_4); 0 = seed SFT only
    (resume it with --iterations T, e.g. once per method from the same M_1)"""
    n_seed: int = 128
    """|D_S|: seed SFT examples (paper ≈3.4K OASST1 examples)"""
    prompts_per_iteration: int = 64
    """|D_U^t|: prompts sampled in each iteration, disjoint across iterations (§3)"""
    group_size: int = 5
    """N: answers sampled per prompt (paper 5)"""
    top_p: float = 0.95
    """nucleus sampling of the N answers (paper 0.95)"""
    beta: float = 0.1
    """β: DPO inverse temperature (paper 0.1)"""
    consistency: Literal["avg", "dyn", "off"] | None = None
    """C per pair: `avg` the mean C̄ over the pairs (paper), `dyn` its own C_x (missing → C̄), `off` C = 1
    (plain DPO). Default: avg, or off with --judge"""
    measure: Literal["kendall", "spearman", "toporder"] = "kendall"
    """rank agreement behind C_x: Kendall τ (paper), Spearman ρ, or top-order (argmax and argmin agree)"""
    judge: bool = False
    """SRLM baseline: rank answers by the model's own LLM-as-judge score (Yuan et al.'s prompt) instead
    of the implicit reward, and train with C = 1"""
    judge_samples: int = 3
    """SRLM (--judge): verdicts sampled per answer, parsed scores averaged (Yuan et al. 3)"""
    judge_max_new_tokens: int = 128
    """SRLM (--judge): generation budget of a verdict (justification of ≤ 100 words, then "Score: <points>")"""
    score_truncated: bool = False
    """also rank answers that never ended within --max-new-tokens (the released code does: at 768 tokens they
    are rare); by default they get no reward and drop out of both rankings"""
    sft_epochs: int = 5
    """epochs of seed SFT (paper 5)"""
    sft_lr: float = 2e-5
    """seed SFT learning rate (paper 5e-6 at 7–8B)"""
    epochs: int = 1
    """DPO epochs over each iteration's pairs (paper 1)"""
    batch_size: int = 8
    """pairs per DPO step and examples per SFT step (paper 32)"""
    micro_batch_size: int = 8
    """pairs (SFT: examples) per forward/backward on one process (gradient accumulation; no effect on the maths)"""
    gen_batch_size: int = 80
    """rows (prompt copies) per `generate` call"""
    weight_decay: float = 0.01
    """AdamW weight decay (paper 0.01)"""
    warmup_ratio: float = 0.1
    """linear warm-up over this fraction of a stage's steps, then cosine decay to 0 (paper 0.1)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""

    RULES: ClassVar[dict[str, str]] = {
        "iterations": ">= 0", "n_seed": ">= 1", "prompts_per_iteration": ">= 1", "group_size": ">= 2",
        "top_p": "(0, 1]", "beta": "> 0", "judge_samples": ">= 1", "judge_max_new_tokens": ">= 1", "sft_epochs": ">= 1",
        "sft_lr": ">= 0", "epochs": ">= 1", "batch_size": "> 0", "micro_batch_size": "> 0", "gen_batch_size": "> 0",
        "weight_decay": ">= 0", "warmup_ratio": "[0, 1]", "max_grad_norm": "> 0"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # pairs and SFT examples are split across processes

    def check(self) -> None:
        super().check()
        need = self.n_seed + self.iterations * self.prompts_per_iteration
        require(self.n_train >= need, "n_train", self.n_train,
                f"must hold --n-seed + --iterations × --prompts-per-iteration = {need} disjoint problems")
        require(not (self.judge and self.consistency in ("avg", "dyn")), "consistency", self.consistency,
                "--judge (SRLM) trains with C = 1: use --consistency off or leave it unset")


def resolve(args: Args) -> Args:
    return args if args.consistency else dataclasses.replace(args, consistency="off" if args.judge else "avg")


# ------------------------------------------------------------------------------------ ALGO LOGIC
def self_reward(logp: torch.Tensor, prev_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """r_t = Σ (log π_{M_t} − log π_{M_{t−1}}) over response tokens; with no predecessor (M_0), the
    length-normalised log-likelihood (1/|y|) Σ log π_{M_0} (§2). logp, prev_logp, mask: [N, T]."""
    mask = mask.to(logp.dtype)
    if prev_logp is None:
        return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
    return ((logp - prev_logp) * mask).sum(1)


def ordinal_ranks(x: Sequence[float]) -> list[int]:
    """scipy.stats.rankdata(x, method="ordinal"): ranks 1..N, equal values ranked by index."""
    ranks = [0] * len(x)
    for r, i in enumerate(sorted(range(len(x)), key=lambda i: (x[i], i)), start=1):
        ranks[i] = r
    return ranks


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """τ = (concordant − discordant) / (N(N−1)/2) of two lists without ties (ordinal ranks)."""
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += (1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1)
    return s / (n * (n - 1) / 2)


def consistency_rate(r_cur: Sequence[float] | None, r_prev: Sequence[float] | None,
                     measure: str = "kendall") -> float | None:
    """C_x ∈ [0, 1] of one prompt: agreement of the rankings by r_t and r_{t−1} (§2). None (missing)
    when a list is absent, has a None, the lengths differ, or N < 2 — never a guess."""
    if r_cur is None or r_prev is None or len(r_cur) != len(r_prev) or len(r_cur) < 2 \
            or any(v is None for v in (*r_cur, *r_prev)):
        return None
    a, b = ordinal_ranks(r_cur), ordinal_ranks(r_prev)
    if measure == "kendall":
        return (kendall_tau(a, b) + 1) / 2
    if measure == "spearman":  # ρ = 1 − 6 Σ d² / (N(N² − 1)) on ranks without ties
        n = len(a)
        rho = 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))
        return (rho + 1) / 2
    if measure == "toporder":  # the intended rule: the same best and the same worst answer (§8.10)
        return float(a.index(n := len(a)) == b.index(n) and a.index(1) == b.index(1))
    raise ValueError(f"unknown measure {measure!r}")


def preference_pair(rewards: Sequence[float]) -> tuple[int, int] | None:
    """(y+, y−) = (argmax, argmin) of the current rewards, first index on ties (np.argmax); None when
    they coincide (all rewards equal): the prompt gives no pair (§2)."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if best == worst else (best, worst)


def attach_consistency(pair_keys: Sequence, rates: dict, mode: str) -> tuple[dict, float]:
    """C of every pair, looked up by the pair's own prompt key (never by position, pitfall §7):
    avg → C̄ for all, dyn → its own C_x or C̄ when missing, off → 1. C̄ is the mean of the non-missing
    C_x over the pairs (not over every scored prompt), 1 when none is known. Returns ({key: C}, C̄)."""
    known = [rates[k] for k in pair_keys if rates.get(k) is not None]
    c_bar = sum(known) / len(known) if known else 1.0
    if mode == "off":
        return {k: 1.0 for k in pair_keys}, c_bar
    if mode == "avg":
        return {k: c_bar for k in pair_keys}, c_bar
    if mode == "dyn":
        return {k: rates[k] if rates.get(k) is not None else c_bar for k in pair_keys}, c_bar
    raise ValueError(f"unknown consistency mode {mode!r}")


def pair_up(ranking: dict, r_cur: dict, r_prev: dict, measure: str = "kendall", mode: str = "avg"):
    """Every step of §2 that needs no model, keyed by prompt: C_x from r_cur[k] and r_prev[k], the pair
    from ranking[k] (r_cur[k], or the judge's scores), then C attached by key. A prompt whose C_x is
    missing keeps its pair (C̄ under dyn); a prompt without a ranking or with one value gives no pair.
    Returns ({k: (y+, y−)}, {k: C}, C̄, {k: C_x or None})."""
    rates = {k: consistency_rate(r_cur.get(k), r_prev.get(k), measure) for k in ranking}
    pairs = {k: pair for k, r in ranking.items()
             if r is not None and len(r) >= 2 and None not in r and (pair := preference_pair(r)) is not None}
    c_of, c_bar = attach_consistency(list(pairs), rates, mode)
    return pairs, c_of, c_bar, rates


def cream_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, c: torch.Tensor, beta: float, num_pairs: float | None = None):
    """L = C·(−log σ(βΔ)) + (1 − C)·(−log σ(−βΔ)), summed over pairs / num_pairs (§2). Inputs are
    sequence log-prob sums [B]; C [B] is a constant. dL/d(βΔ) = σ(βΔ) − C. Returns (loss, βΔ)."""
    logits = beta * ((chosen_logp - ref_chosen) - (rejected_logp - ref_rejected))
    c = c.to(logits.dtype)
    losses = -c * F.logsigmoid(logits) - (1 - c) * F.logsigmoid(-logits)
    return losses.sum() / (len(losses) if num_pairs is None else num_pairs), logits.detach()


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: float) -> torch.Tensor:
    """−Σ log p over response tokens / tokens of the whole batch: the intended response-only SFT loss (§7)."""
    return -(logp * mask.to(logp.dtype)).sum() / max(float(num_tokens), 1.0)


JUDGE_PROMPT = (  # Yuan et al. 2024, Fig. 2 (prompts.py in the CREAM code), with ASCII quotes
    "Review the user's question and the corresponding response using the additive 5-point scoring system "
    "described below. Points are accumulated based on the satisfaction of each criterion:\n\n"
    "- Add 1 point if the response is relevant and provides some information related to the user's inquiry, "
    "even if it is incomplete or contains some irrelevant content.\n"
    "- Add another point if the response addresses a substantial portion of the user's question, but does not "
    "completely resolve the query or provide a direct answer.\n"
    "- Award a third point if the response answers the basic elements of the user's question in a useful way, "
    "regardless of whether it seems to have been written by an AI Assistant or if it has elements typically "
    "found in blogs or search results.\n"
    "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing "
    "the user's question directly and comprehensively, and is well-organized and helpful, even if there is "
    "slight room for improvement in clarity, conciseness or focus.\n"
    "- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI "
    "Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a "
    "high-quality, engaging, and insightful answer.\n\n"
    "User: {question}\n\n<response>{response}</response>\n\n"
    "After examining the user's instruction and the response:\n\n"
    "- Briefly justify your total score, up to 100 words.\n"
    '- Conclude with the score using the format: "Score: <total points>"\n\n'
    "Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To "
    "evaluate the response in alignment with this additive scoring model, we'll systematically attribute "
    "points based on the outlined criteria.")
_SCORE = re.compile(r"Score:\s*(\d{1,3})(?!\d)")


def parse_judge_score(text: str) -> int | None:
    """The integer after the last "Score:", clamped to [0, 5]; None when there is none (§5).
    A regex over at most 20k characters: model text is never evaluated."""
    found = _SCORE.findall(text[:20_000])
    return None if not found else min(max(int(found[-1]), 0), 5)


def stage_batches(n: int, batch_size: int, epochs: int, world: int, seed: int) -> list[list[int]]:
    """Indices of each optimizer step: a seeded permutation per epoch, cut into batches of `batch_size`;
    the last batch is cut to a multiple of the process count (every process needs ≥ 1 example)."""
    order = []
    for e in range(epochs):
        order += torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1009 + e)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batches:
        batches[-1] = batches[-1][:len(batches[-1]) // world * world]
    return [b for b in batches if b]


def lr_factor(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warm-up over ⌈ratio·total⌉ steps, then cosine decay to 0 (HF's cosine schedule)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def pad_batch(tokenizer, prompts: list[list[int]], completions: list[list[int]], device):
    """Prompts left-padded, completions right-padded (the layout of `generate`); masks are 1 on real tokens."""
    p_ids, p_mask = encode_prompts(tokenizer, prompts)
    width = max(len(c) for c in completions)
    c_ids = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), width))
    for i, c in enumerate(completions):
        c_ids[i, :len(c)], c_mask[i, :len(c)] = torch.tensor(c, dtype=torch.long), 1.0
    return p_ids.to(device), p_mask.to(device), c_ids.to(device), c_mask.to(device)


def pair_logps(model, tokenizer, pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-prob sums (T = 1) of the chosen and the rejected answers of `pairs`, in one batch."""
    prompts = [p["prompt"] for p in pairs] * 2
    batch = pad_batch(tokenizer, prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], device)
    logp = token_logprobs(model, *batch).sum(1)
    return logp[:len(pairs)], logp[len(pairs):]


@torch.no_grad()
def precompute_reference(model, tokenizer, pairs: list[dict], batches: list[list[int]], rank: int, world: int,
                         micro_batch_size: int, device) -> None:
    """π_ref = M_t, the model about to be trained: the log-probs of every pair under it, once, before any
    update (§2), stored in the pairs. Computed in exactly the micro-batches the training loop will use, so
    that Δ = 0 and L = log 2 at the first step, bit for bit."""
    for b in batches:
        mine = [pairs[i] for i in b[rank::world]]
        for j in range(0, len(mine), micro_batch_size):
            chunk = mine[j:j + micro_batch_size]
            chosen, rejected = pair_logps(model, tokenizer, chunk, device)
            for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                p["ref_chosen"], p["ref_rejected"] = c, r


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("cream", args, presets=resolve, label="srlm" if args.judge else None)
    args, acc, task, log = run.args, run.accelerator, run.task, run.log
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    lm = run.setup_lm(weight_decay=args.weight_decay, restore=False)
    model, tokenizer, optimizer = lm.model, lm.tokenizer, lm.optimizer
    names = [n for n, p in lm.policy.named_parameters() if p.requires_grad]  # what a snapshot M_k holds
    models_dir = run.dir / "models"
    snapshot_path = lambda k: models_dir / f"M{k}.safetensors"  # noqa: E731

    def save_snapshot(k: int) -> None:
        """M_k's trainable weights on disk: rewards of later iterations need M_{t−1} and M_{t−2} (§7)."""
        from safetensors.torch import save_file

        if acc.is_main_process:
            models_dir.mkdir(exist_ok=True)
            params = dict(lm.policy.named_parameters())
            save_file({n: params[n].detach().cpu().contiguous() for n in names}, str(snapshot_path(k)) + ".tmp")
            Path(str(snapshot_path(k)) + ".tmp").rename(snapshot_path(k))
            for old in models_dir.glob("M*.safetensors"):  # keep M_k, M_{k−1}, M_{k−2}
                if int(old.stem[1:]) < k - 2:
                    old.unlink()
        acc.wait_for_everyone()

    def frozen(k: int):
        """A frozen copy of the policy holding M_k's weights (for r_t and r_{t−1})."""
        from safetensors.torch import load_file

        model_k = run.frozen_copy(lm)  # the policy's structure and precision (with LoRA: the whole peft model)
        model_k.load_state_dict(load_file(str(snapshot_path(k))), strict=False)  # copied onto its device
        return model_k

    state = run.restore(lm)  # weights, optimizer and RNG of the last checkpoint (--resume), else {}
    t, done = state.get("stage", 0), state.get("update", 0)  # M_t is the policy; `done` updates of stage t
    pairs, metrics, sums = state.get("pairs"), state.get("metrics") or {}, state.get("sums") or {}
    if t == 0 and not args.resume:
        save_snapshot(0)
    prompt_ids = lambda p: tokenizer(chat_prompt(tokenizer, p.prompt, task.system_prompt),  # noqa: E731
                                     add_special_tokens=False).input_ids
    before = run.evaluate(lm, 0, args.max_new_tokens) if t == 0 and done == 0 else None
    last_eval = before
    bar = tqdm(total=args.iterations + 1, initial=t, desc="cream", disable=not acc.is_main_process)
    try:
        # stage 0: SFT M_0 → M_1; stage t ≥ 1: CREAM iteration t, M_t → M_{t+1}; none once --token-budget is spent
        while t <= args.iterations and run.budget_left():
            t0 = time.time()
            torch.manual_seed(args.seed * 1_000_003 + 1000 * t + rank)  # each stage samples the same on resume
            if t == 0:  # ---- seed SFT on D_S: reference solutions, loss on response tokens only (§3.1, §7)
                items = [{"prompt": prompt_ids(p), "answer": tokenizer(p.meta.get("solution", p.answer),
                          add_special_tokens=False).input_ids + [tokenizer.eos_token_id]} for p in task.train[:args.n_seed]]
                epochs, peak_lr = args.sft_epochs, args.sft_lr
            else:  # ---- CREAM iteration t: sample, self-reward, rank, pair (§3.2 a–d)
                if pairs is None:
                    model.eval()
                    new, metrics = build_pairs(args, lm, run, t, frozen)
                    precompute_reference(lm.policy, tokenizer, new, stage_batches(len(new), args.batch_size, args.epochs,
                                         world, args.seed + t), rank, world, args.micro_batch_size, device)
                    metrics["perf/gen_s"] = time.time() - t0 - metrics["perf/reward_s"]
                    pairs = new  # complete: an interrupt from here on keeps the pairs
                items, epochs, peak_lr = pairs, args.epochs, args.lr

            # ---- train M_{t+1} from M_t: one fresh AdamW run with warm-up and cosine, each step atomic (§3.2 e)
            batches = stage_batches(len(items), args.batch_size, epochs, world, args.seed + t)
            seen = max(sum(map(len, batches)), 1)
            if done == 0:
                optimizer.state.clear()  # a new Trainer run per stage: fresh Adam moments
                sums = {"loss": 0.0, "grad_norm": 0.0, "margin": 0.0, "margin_acc": 0.0, "tokens": 0}
            t1 = time.time()
            model.train()
            for k in range(done, len(batches)):
                with run.atomic():
                    for group in optimizer.param_groups:
                        group["lr"] = peak_lr * lr_factor(k, len(batches), args.warmup_ratio)
                    batch = [items[i] for i in batches[k]]
                    mine = batch[rank::world]
                    chunks = [mine[j:j + args.micro_batch_size] for j in range(0, len(mine), args.micro_batch_size)]
                    n_tok = sum(len(x["answer"]) if t == 0 else len(x["chosen"]) + len(x["rejected"]) for x in batch)
                    for m, chunk in enumerate(chunks):
                        with nullcontext() if m == len(chunks) - 1 else acc.no_sync(model):
                            if t == 0:
                                b = pad_batch(tokenizer, [x["prompt"] for x in chunk], [x["answer"] for x in chunk], device)
                                loss, margins = sft_loss(token_logprobs(model, *b), b[3], n_tok), torch.zeros(0)
                            else:
                                pc, pr = pair_logps(model, tokenizer, chunk, device)
                                col = lambda key: torch.tensor([x[key] for x in chunk], device=device)  # noqa: E731
                                loss, margins = cream_loss(pc, pr, col("ref_chosen"), col("ref_rejected"), col("c"),
                                                           args.beta, num_pairs=len(batch))
                            acc.backward(loss * world)  # DDP averages over processes; the normaliser is global
                        stats = acc.reduce(torch.tensor([loss.item(), margins.sum().item(), (margins > 0).sum().item()],
                                                        device=device), reduction="sum").tolist()
                        sums["loss"] += stats[0] / len(batches)
                        sums["margin"] += stats[1] / seen
                        sums["margin_acc"] += stats[2] / seen
                    sums["grad_norm"] += float(acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)) / len(batches)
                    sums["tokens"] += n_tok
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    done = k + 1
            t_update = time.time() - t1

            # ---- M_{t+1}: evaluate, log, keep its weights for later rewards, checkpoint
            last_eval = run.evaluate(lm, t + 1, args.max_new_tokens)
            metrics |= {"train/loss": sums["loss"], "train/grad_norm": sums["grad_norm"], "train/steps": len(batches),
                        "perf/update_s": t_update, "perf/step_s": time.time() - t0,
                        "perf/tokens_per_s": sums["tokens"] / max(t_update, 1e-9)}
            if t > 0:
                metrics |= {"train/margin": sums["margin"], "cream/margin_accuracy": sums["margin_acc"]}
            log(f"stage {t} ({'SFT' if t == 0 else f'iteration {t}'}): {len(items)} examples, {len(batches)} steps, "
                f"loss {sums['loss']:.4f}" + (f", C̄ {metrics['cream/consistency']:.3f}" if t else ""))
            with run.atomic():  # the stage's log line, M_{t+1}'s snapshot and the checkpoint go together
                run.logger.log(metrics, t + 1)
                t, done, pairs, metrics, sums = t + 1, 0, None, {}, {}
                save_snapshot(t)
                run.save(lm, stage=t, update=0)
            bar.update(1)
    except KeyboardInterrupt:
        run.save_on_interrupt(lm, f"stage {t} update {done}", stage=t, update=done, pairs=pairs, metrics=metrics,
                              sums=sums)
        raise
    finally:
        bar.close()
        run.close()
    return run.summary(lm, before, last_eval)


def build_pairs(args: Args, lm, run, t: int, frozen) -> tuple[list[dict], dict]:
    """Iteration t, §3.2 a–d: N answers per prompt of D_U^t from M_t (split across processes), r_t and
    r_{t−1} for each, C_x per prompt, the (y+, y−) pairs with their C. Every process returns the same
    list, ordered by prompt id; each pair carries its prompt id, so C can only attach to its own prompt."""
    acc, task, tokenizer = run.accelerator, run.task, lm.tokenizer
    rank, world = acc.process_index, acc.num_processes
    start = args.n_seed + (t - 1) * args.prompts_per_iteration
    ids = list(range(start, start + args.prompts_per_iteration))[rank::world]  # problem indices = prompt keys
    problems = [task.train[i] for i in ids]
    N = args.group_size
    ro = generate_in_budget(run, lm.model, tokenizer, [chat_prompt(tokenizer, p.prompt, task.system_prompt) for p in problems],
                            N, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            batch_size=args.gen_batch_size)
    ids, problems = ids[:len(ro) // N], problems[:len(ro) // N]  # a spent --token-budget: the prompts it finished
    t_reward = time.time()
    rows, mask = torch.arange(len(ro), device=acc.device), ro.completion_mask.to(acc.device)
    logp = {t: rollout_logprobs(lm.policy, ro, rows, 1.0, args.micro_batch_size)}
    for k in (t - 1, t - 2):
        if k >= 0:
            m = frozen(k)
            logp[k] = rollout_logprobs(m, ro, rows, 1.0, args.micro_batch_size)
            del m
    r_cur = self_reward(logp[t], logp[t - 1], mask).tolist()
    r_prev = self_reward(logp[t - 1], logp.get(t - 2), mask).tolist()
    scores = judge_scores(args, lm, run, problems, ro.texts) if args.judge else None
    t_reward = time.time() - t_reward
    entries = []  # one per prompt: its rewards and answers (gathered from every process)
    for j, (pid, prob) in enumerate(zip(ids, problems)):
        row = lambda i: j * N + i  # noqa: E731  the rollout row of answer i of this prompt
        ended = [i for i in range(N) if args.score_truncated or not bool(ro.truncated[row(i)])]
        ranked = ended if scores is None else [i for i in ended if scores[row(i)] is not None]  # SRLM: parsed only
        entries.append({
            "id": pid, "prompt": ro.prompt_ids[row(0)][ro.prompt_mask[row(0)].bool()].tolist(),
            "cur": [r_cur[row(i)] for i in ended], "prev": [r_prev[row(i)] for i in ended], "ranked": ranked,
            "ranking": [r_cur[row(i)] if scores is None else scores[row(i)] for i in ranked],
            "answers": [ro.completion_ids[row(i)][ro.completion_mask[row(i)].bool()].tolist() for i in range(N)],
            "correct": [task.verify(ro.texts[row(i)], prob).correct for i in range(N)]})
    entries = sorted(gather_object(entries) if world > 1 else entries, key=lambda e: e["id"])
    by_id = {e["id"]: e for e in entries}
    chosen, c_of, c_bar, rates = pair_up({e["id"]: e["ranking"] for e in entries}, {e["id"]: e["cur"] for e in entries},
                                         {e["id"]: e["prev"] for e in entries}, args.measure, args.consistency)
    pairs = []
    for pid, (hi, lo) in chosen.items():  # positions in the ranking → answer indices
        e = by_id[pid]
        a, b = e["ranked"][hi], e["ranked"][lo]
        pairs.append({"id": pid, "prompt": e["prompt"], "chosen": e["answers"][a], "rejected": e["answers"][b],
                      "c": c_of[pid], "gap": e["ranking"][hi] - e["ranking"][lo],
                      "chosen_correct": e["correct"][a], "rejected_correct": e["correct"][b]})
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    n_answers = N * len(entries)
    known = [rates[k] for k in chosen if rates[k] is not None]  # C̄ as trained with (NaN when no pair has one)
    metrics = {"cream/consistency": mean(known), "cream/consistency_all": mean([c for c in rates.values() if c is not None]),
               "cream/c_used": mean([p["c"] for p in pairs]), "cream/pairs": len(pairs), "cream/prompts": len(entries),
               "cream/reward_gap": mean([p["gap"] for p in pairs]),
               "cream/chosen_correct": mean([float(p["chosen_correct"]) for p in pairs]),
               "cream/rejected_correct": mean([float(p["rejected_correct"]) for p in pairs]),
               "train/reward": mean([x for e in entries for x in e["cur"]]),
               "train/accuracy": sum(sum(e["correct"]) for e in entries) / max(n_answers, 1),
               "train/scored_frac": sum(len(e["ranked"]) for e in entries) / max(n_answers, 1),
               "perf/reward_s": t_reward}
    return pairs, metrics


def judge_scores(args: Args, lm, run, problems, texts: list[str]) -> list[float | None]:
    """SRLM (Yuan et al. §2.3): the model judges each answer `judge_samples` times with the additive
    5-point prompt; an answer's score is the mean of its parsed verdicts, None when none parses (or when a
    spent --token-budget left it without verdicts)."""
    N, tok = args.group_size, lm.tokenizer
    prompts = [chat_prompt(tok, JUDGE_PROMPT.format(question=problems[i // N].prompt, response=text))
               for i, text in enumerate(texts)]
    ro = generate_in_budget(run, lm.model, tok, prompts, args.judge_samples, max_new_tokens=args.judge_max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, batch_size=args.gen_batch_size)
    verdicts = ro.texts if ro is not None else []
    out = []
    for i in range(len(texts)):
        parsed = [s for v in verdicts[i * args.judge_samples:(i + 1) * args.judge_samples]
                  if (s := parse_judge_score(v)) is not None]
        out.append(sum(parsed) / len(parsed) if parsed else None)
    return out


def generate_in_budget(run, model, tokenizer, prompts: list[str], n: int, batch_size: int, **kw):
    """`generate(prompts, n, batch_size=batch_size, **kw)`. With --token-budget: the same rows in the same chunks of
    `batch_size` (the same samples), the budget checked before each chunk; once it is spent (on every process at the
    same chunk), the rows of the prompts finished so far, or None when there are none."""
    if not run.args.token_budget:
        return generate(model, tokenizer, prompts, n=n, batch_size=batch_size, **kw)
    rows, parts = [p for p in prompts for _ in range(n)], []  # a prompt repeated n times: what generate(n=n) samples
    most = max(gather_object([len(rows)])) if run.accelerator.num_processes > 1 else len(rows)
    for start in range(0, most, batch_size):
        if not run.budget_left():  # collective: every process checks as often
            break
        if rows[start:start + batch_size]:
            parts.append(generate(model, tokenizer, rows[start:start + batch_size], batch_size=batch_size, **kw))
    keep = sum(map(len, parts)) // n * n
    if keep == 0:
        return None
    return cat_rollouts(parts, [range(min(len(r), keep - sum(map(len, parts[:k])))) for k, r in enumerate(parts)])


if __name__ == "__main__":
    main(cli(Args))

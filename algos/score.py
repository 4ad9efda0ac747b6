"""SCoRe — Self-Correction via Reinforcement Learning: two-turn on-policy REINFORCE in two stages.

Paper: Kumar et al., "Training Language Models to Self-Correct via Reinforcement Learning",
arXiv:2409.12917 (v1 §3–5 and App. A; hyperparameters from v2 App. B, Table 5). No official code.

Idea: the model answers a problem (turn 1), then reads a fixed instruction that never says whether it
was right, and answers again (turn 2). Both turns are sampled on-policy from the current model and
trained with REINFORCE against a 0/1 verifier. Naive multi-turn RL collapses (turn 2 copies turn 1),
so training has two stages. Stage I rewards turn 2 only, while a strong KL keeps turn 1 at the base
model: turn 2 must learn to correct the base model's own answers. Stage II rewards both turns and
pays turn 2 a progress bonus, so going from wrong to right pays far more than being right twice.

    x2 = [x1, y1, p1]                  turn 2 sees the problem, its first answer and the instruction p1
    Stage I  (Eq. 3)   max E[ r̂(y2) − β2·KL(π_θ(·|x1) ‖ π_ref(·|x1)) − β1·KL(π_θ(·|x2) ‖ π_ref(·|x2)) ]
    Stage II (Eq. 4)   max E[ Σ_{i=1,2} r_i − β1·KL(π_θ(·|x_i) ‖ π_ref(·|x_i)) ],   r1 = r̂(y1),  r2 = r̃2
    bonus    (Eq. 5)   r̃2 = r̂(y2) + α·(r̂(y2) − r̂(y1))      (α = 10, (r1, r2) = 00, 01, 11, 10 → 0, 11, 1, −10)

Discount γ = 0: the tokens of turn i are credited with turn i's reward only (the return is not summed
over turns). With ℓ(y|x) = Σ_t log π_θ(y_t | x, y_<t) over the turn's own tokens (the prompt, and in
turn 2 also y1 and p1, are context) and K̂(y|x) = Σ_t k3_t, k3 = e^{ℓ_ref − ℓ_θ} − (ℓ_ref − ℓ_θ) − 1,
the per-rollout losses, averaged over the batch, are

    L_I  = −(r̂2 − b2)·ℓ(y2|x2) + β2·K̂(y1|x1) + β1·K̂(y2|x2)                      (Eq. 3; y1 gets only the KL)
    L_II = −(r1 − b1)·ℓ(y1|x1) − (r̃2 − b2)·ℓ(y2|x2) + β1·[K̂(y1|x1) + K̂(y2|x2)]   (Eq. 4–5)

with rewards and baselines b_i detached constants (b_i = 0 as in the paper and its reproductions, or
the batch mean of turn i's reward with `--baseline`) and π_ref the frozen base model in both stages.
Stages run S1 steps of Stage I, then S2 of Stage II, cycling while `--total-steps` lasts (v1 alternates
I → II → I → II; v2 runs one round). Evaluation is two-turn greedy: Acc@t1, Acc@t2, Δ = Acc@t2 − Acc@t1
= Δ^{i→c} − Δ^{c→i} (both fractions of all N problems), the fraction of turn-2 answers that changed and
the edit-distance ratio of y1 and y2; `--eval-k K` adds the paper's inference scaling (K sampled
first answers, each self-corrected once, majority vote over the K second answers; parallel: 2K first answers).

Decisions where the paper is silent, and simplifications: one rollout per problem, one Adam step per
batch; ℓ is a sum over tokens (the sequence-level objective, no length normalisation); K̂ is the k3
sample estimate on the sampled tokens, whose gradient (sampling weights detached) is that of
KL(π_ref ‖ π_θ): it vanishes at π_θ = π_ref and pulls towards it, which is what the anchor needs. A
truncated answer (no EOS within --max-new-tokens) earns reward 0 in training unless --grade-truncated;
evaluation grades the text, as `shared.evaluation` does. p1 is the paper's MATH instruction with the task's own answer format in place
of MATH's. `--offline-frac` samples that share of first answers from the base model ("offline prompts",
§5.2): those rows train turn 2 only (no turn-1 term, which would be off-policy). The model is ~10⁴×
smaller and the budgets ~10³× shorter than the paper's (Gemini, 3000 steps × 512).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/score.py` finds `shared`

import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from shared.args import StepArgs, cli, require
from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.rollouts import PromptStream, rollout_logprobs
from shared.run import Run
from shared.sampling import cat_rollouts, generate, next_turn_prompts, uncounted
from shared.verifiers import parse_number


@dataclass
class Args(StepArgs):  # the experiment flags (--model, --seed, --lr, ...) come from shared/args.py
    task: str = "multistep"
    """`multistep` (step-by-step ± problems: room to correct a first attempt), `arith`, `countdown`, `gsm8k`, `math500`"""
    n_train: int = 1000
    """training problems drawn from the task (multistep level 1 has 1691)"""
    max_new_tokens: int = 64
    """generation budget of each turn (L_max); also used for the held-out evaluation"""
    # ---- algorithm (v2 Table 5, MATH column, where the paper gives a value)
    stage1_steps: int = 6
    """S1: Stage I steps per round (Eq. 3); 0 = no Stage I (the paper's ablation)"""
    stage2_steps: int = 6
    """S2: Stage II steps per round (Eq. 4); 0 = Stage I only. Rounds repeat while --total-steps lasts"""
    batch_size: int = 8
    """problems per step, one two-turn rollout each (the paper: 512)"""
    alpha: float = 10.0
    """α in Eq. 5: progress bonus α·(r̂(y2) − r̂(y1)) added to the turn-2 reward in Stage II"""
    beta1: float = 0.01
    """β1: KL to π_ref on every turn the stage trains (both turns in Stage II, turn 2 in Stage I)"""
    beta2: float = 0.1
    """β2: the strong Stage I KL on turn 1 that keeps it at the base model (MATH 0.1, code 0.25)"""
    baseline: bool = False
    """b_i: subtract the batch mean of each turn's reward (off: plain REINFORCE as in the paper's reproductions)"""
    offline_frac: float = 0.0
    """share of each batch whose first answer y1 is sampled from the base model π_ref (§5.2 'offline prompts')"""
    grade_truncated: bool = False
    """grade an answer cut off at --max-new-tokens on its text in training (default: it earns 0, as in grpo.py)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    micro_batch_size: int = 8
    """rollouts per forward/backward on one process (gradient accumulation; no effect on the maths)"""
    gen_batch_size: int | None = None
    """rows per `generate` call (None = all at once)"""
    eval_k: int = 0
    """inference scaling at every evaluation: K sampled first answers per problem, each self-corrected once,
    majority vote over the K second answers, vs a vote over 2K first answers (0 = off; the paper: K = 16)"""
    eval_temperature: float = 0.7
    """sampling temperature of the inference-scaling evaluation (the paper: 0.7)"""

    RULES: ClassVar[dict[str, str]] = {
        "stage1_steps": ">= 0", "stage2_steps": ">= 0", "batch_size": "> 0", "alpha": ">= 0", "beta1": ">= 0",
        "beta2": ">= 0", "offline_frac": "[0, 1]", "max_grad_norm": "> 0", "micro_batch_size": "> 0",
        "gen_batch_size": "> 0", "eval_k": ">= 0", "eval_temperature": "> 0"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # problems are split across processes

    def check(self) -> None:
        super().check()
        require(self.stage1_steps + self.stage2_steps > 0, "stage2_steps", self.stage2_steps,
                "--stage1-steps and --stage2-steps cannot both be 0")


# Self-correction instruction p1: v1 App. A's MATH instruction, word for word, up to its answer format,
# then the task's own answer format (the verifier reads that format). It never says whether y1 was right.
P1 = ("There might be an error in the solution above because of lack of understanding of the question. "
      "Please correct the error, if any, and rewrite the solution. Only output the final solution! ")
ANSWER_FORMAT = {
    "multistep": 'Write one calculation per line, then end with "Answer: <number>".',
    "arith": "Give only the final number.",
    "countdown": 'Write the equation on the last line after "Answer:", for example: Answer: (1 + 2) * 3',
    "countdown-hf": 'Write the equation on the last line after "Answer:", for example: Answer: (1 + 2) * 3',
    "gsm8k": 'Give the final number on the last line as "Answer: <number>".',
    "math500": "Put your final answer within \\boxed{}.",
}


def stage_of(step: int, s1: int, s2: int) -> int:
    """The stage (1 or 2) of the step with 0-based index `step`: S1 Stage I steps, S2 Stage II, repeat."""
    return 1 if step % (s1 + s2) < s1 else 2


# ------------------------------------------------------------------------------------ ALGO LOGIC
def shaped_turn2_reward(r1: torch.Tensor, r2: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 5: r̃2 = r̂(y2) + α·(r̂(y2) − r̂(y1)). Only turn 2 is shaped; r1 itself stays r̂(y1)."""
    return r2 + alpha * (r2 - r1)


def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = π_ref/π_θ − log(π_ref/π_θ) − 1 ≥ 0; differentiable in logp (ref_logp is a constant)."""
    log_q = ref_logp - logp
    return torch.exp(log_q) - log_q - 1


def two_turn_reinforce(logp1, ref1, mask1, logp2, ref2, mask2, coef1, coef2, kl1: float, kl2: float,
                       num_seqs: int | None = None):
    """Σ_{i=1,2} [ −coef_i·ℓ(y_i|x_i) + kl_i·K̂(y_i|x_i) ], summed over rollouts and divided by `num_seqs`.

    logp_i [N, T_i] carries the gradient, ref_i [N, T_i] (None when kl_i = 0) does not, mask_i [N, T_i] is 1
    on the turn's own answer tokens (EOS included) and 0 on everything that is context; coef_i [N] are the
    detached reward coefficients. γ = 0 is the structure itself: coef_i multiplies turn i's tokens only.
    logp1 may be None when turn 1 has neither a reward nor a KL term (Stage I with β2 = 0).
    `num_seqs`: the batch size over all micro-batches and processes (default: this batch), so that
    summing the losses of micro-batches gives the loss of the batch.
    """
    num_seqs = logp2.shape[0] if num_seqs is None else num_seqs
    loss, stats = 0.0, {}
    for i, (logp, ref, mask, coef, beta) in enumerate([(logp1, ref1, mask1, coef1, kl1), (logp2, ref2, mask2, coef2, kl2)], 1):
        if logp is None:
            continue
        mask = mask.to(logp.dtype)
        seq_logp = (logp * mask).sum(1)  # ℓ(y_i|x_i)
        loss = loss - (coef.to(logp.dtype).detach() * seq_logp).sum() / num_seqs
        if ref is not None:
            seq_kl = (k3(logp, ref.detach()) * mask).sum(1)  # K̂(y_i|x_i)
            loss = loss + beta * seq_kl.sum() / num_seqs
            stats[f"kl{i}"] = seq_kl.detach().sum() / num_seqs
    return loss, stats


def stage1_loss(logp1, ref1, mask1, logp2, ref2, mask2, r2, *, beta1: float, beta2: float, b2=0.0,
                num_seqs: int | None = None):
    """Eq. 3 per rollout: L_I = −(r̂2 − b2)·ℓ(y2|x2) + β2·K̂(y1|x1) + β1·K̂(y2|x2).

    Turn 1 has no reward term: its tokens get gradient only through β2·K̂(y1|x1)."""
    zero = torch.zeros_like(r2)
    return two_turn_reinforce(logp1, ref1, mask1, logp2, ref2, mask2, zero, r2 - b2, beta2, beta1, num_seqs)


def stage2_loss(logp1, ref1, mask1, logp2, ref2, mask2, r1, r2_shaped, *, beta1: float, b1=0.0, b2=0.0,
                num_seqs: int | None = None):
    """Eq. 4 per rollout: L_II = −(r̂1 − b1)·ℓ(y1|x1) − (r̃2 − b2)·ℓ(y2|x2) + β1·[K̂(y1|x1) + K̂(y2|x2)],
    with r̃2 from `shaped_turn2_reward` (Eq. 5)."""
    return two_turn_reinforce(logp1, ref1, mask1, logp2, ref2, mask2, r1 - b1, r2_shaped - b2, beta1, beta1, num_seqs)


# ------------------------------------------------------------------------------------ metrics
def self_correction_metrics(c1: torch.Tensor, c2: torch.Tensor) -> dict[str, float]:
    """§3: Acc@t1, Acc@t2, Δ(t1, t2) = Acc@t2 − Acc@t1, Δ^{i→c} = #(wrong → right)/N and Δ^{c→i} =
    #(right → wrong)/N, both divided by all N problems, so Δ = Δ^{i→c} − Δ^{c→i}."""
    c1, c2 = c1.float(), c2.float()
    n = max(c1.numel(), 1)
    return {"acc_t1": c1.sum().item() / n, "acc_t2": c2.sum().item() / n, "delta": (c2 - c1).sum().item() / n,
            "delta_i2c": ((1 - c1) * c2).sum().item() / n, "delta_c2i": (c1 * (1 - c2)).sum().item() / n}


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each), one DP row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def edit_ratio(a: str, b: str) -> float:
    """§4.2's diagnostic: edit distance of y1 and y2 over their total length (0 = identical)."""
    return edit_distance(a, b) / max(len(a) + len(b), 1)


def answer_key(answer: str | None) -> str | None:
    """What majority voting compares: the exact value of a number ("10.0" and "10" agree), else the text."""
    if answer is None:
        return None
    value = parse_number(answer)
    return str(value) if value is not None else answer.strip()


def majority_vote(keys: list) -> int | None:
    """Index of the first answer whose key is the most common one (None keys never win; None if all are None)."""
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, k in enumerate(keys) if k is not None and counts[k] == best)


# ------------------------------------------------------------------------------------ rollouts
def two_turn_rollout(model, base, tokenizer, prompts, instruction: str, *, n_offline: int = 0, n: int = 1, **sampling):
    """y1 ~ π_θ(·|x1) (the first `n_offline` prompts' from `base` instead), then y2 ~ π_θ(·|x2) with
    x2 = x1, y1 token for token, end of turn, p1. `sampling`: max_new_tokens, temperature, greedy, batch_size.
    Returns two Rollouts whose rows match; ro2's completion mask covers y2 only (y1 and p1 are its prompt)."""
    parts = []
    if n_offline:
        parts.append(generate(base, tokenizer, prompts[:n_offline], n=n, **sampling))
    if n_offline < len(prompts):
        parts.append(generate(model, tokenizer, prompts[n_offline:], n=n, **sampling))
    ro1 = parts[0] if len(parts) == 1 else cat_rollouts(parts)
    ro2 = generate(model, tokenizer, next_turn_prompts(tokenizer, ro1, [instruction] * len(ro1)), **sampling)
    return ro1, ro2


def verdicts(task, ro, problems, n: int = 1):
    """The verifier's verdict on every row of `ro` (row j answers problems[j // n])."""
    return [task.verify(text, problems[j // n]) for j, text in enumerate(ro.texts)]


def train_reward(vs, ro, grade_truncated: bool = False) -> torch.Tensor:
    """r̂ ∈ {0, 1}: correct, and (unless `grade_truncated`) not cut off at --max-new-tokens: half an answer
    is not an answer, even when its last number happens to match."""
    return torch.tensor([float(v.correct and (grade_truncated or not t)) for v, t in zip(vs, ro.truncated.tolist())])


@torch.no_grad()
def evaluate_two_turn(run, lm, step: int, problems, instruction: str, split: str = "eval", batch_size: int = 64) -> dict:
    """Greedy two-turn decoding on `problems` (split across processes): Acc@t1, Acc@t2, Δ, Δ^{i→c}, Δ^{c→i},
    answer-changed fraction and edit-distance ratio; with --eval-k the inference-scaling votes. Logged as
    {split}/*, where {split}/accuracy is Acc@t2 (the method's answer)."""
    args, acc, task, tok = run.args, run.accelerator, run.task, lm.tokenizer
    t, records = time.time(), []
    mine = problems[acc.process_index::acc.num_processes]
    greedy = dict(max_new_tokens=args.max_new_tokens, greedy=True)
    with uncounted():  # held-out evaluation: its generations are not part of the --token-budget
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            prompts = [chat_prompt(tok, p.prompt, task.system_prompt) for p in chunk]
            ro1, ro2 = two_turn_rollout(lm.model, None, tok, prompts, instruction, **greedy)
            v1, v2 = verdicts(task, ro1, chunk), verdicts(task, ro2, chunk)
            for j in range(len(chunk)):
                records.append({"c1": v1[j].correct, "c2": v2[j].correct, "f2": v2[j].format_ok,
                                "changed": answer_key(v1[j].answer) != answer_key(v2[j].answer),
                                "edit": edit_ratio(ro1.texts[j], ro2.texts[j]),
                                "len1": ro1.completion_mask[j].sum().item(), "len2": ro2.completion_mask[j].sum().item()})
            if args.eval_k:
                votes = inference_scaling(lm, tok, task, chunk, prompts, instruction, args, seed=args.seed + start)
                for j, r in enumerate(votes):
                    records[start + j].update(r)
    records = gather_object(records) if acc.num_processes > 1 else records
    col = lambda k: torch.tensor([float(r[k]) for r in records])  # noqa: E731
    res = self_correction_metrics(col("c1"), col("c2"))
    res |= {"accuracy": res["acc_t2"], "format_rate": col("f2").mean().item(), "changed_frac": col("changed").mean().item(),
            "edit_ratio": col("edit").mean().item(), "len_t1": col("len1").mean().item(), "len_t2": col("len2").mean().item()}
    if args.eval_k:
        res |= {f"{k}@{args.eval_k}": col(k).mean().item() for k in ("maj_t1", "maj_self_correct", "maj_parallel_2k")}
    run.logger.log({f"{split}/{k}": v for k, v in res.items()} | {f"perf/{split}_s": time.time() - t,
                                                                  "perf/gen_tokens": run.tokens_spent()}, step)
    run.log(f"step {step}: {split} two-turn greedy on {len(records)} problems: Acc@t1 {res['acc_t1']:.3f}, "
            f"Acc@t2 {res['acc_t2']:.3f}, Δ {res['delta']:+.3f} (i→c {res['delta_i2c']:.3f}, c→i {res['delta_c2i']:.3f}), "
            f"changed {res['changed_frac']:.2f}")
    return res


def inference_scaling(lm, tok, task, chunk, prompts, instruction, args, seed: int) -> list[dict]:
    """§6.2: K first answers at T = --eval-temperature, each self-corrected once, a majority vote over the K
    second answers (2K samples) vs a vote over 2K first answers (parallel sampling, the same number of
    samples). Sampled under a forked RNG seeded per chunk, so training draws the same numbers with or without it."""
    K = args.eval_k
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.eval_temperature)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ro1, ro2 = two_turn_rollout(lm.model, None, tok, prompts, instruction, n=K, **sampling)
        extra = generate(lm.model, tok, prompts, n=K, **sampling)
    v1, v2, vx = verdicts(task, ro1, chunk, K), verdicts(task, ro2, chunk, K), verdicts(task, extra, chunk, K)
    out = []
    for j in range(len(chunk)):
        first, second = v1[j * K:(j + 1) * K], v2[j * K:(j + 1) * K]
        parallel = first + vx[j * K:(j + 1) * K]
        row = {}
        for name, vs in (("maj_t1", first), ("maj_self_correct", second), ("maj_parallel_2k", parallel)):
            i = majority_vote([answer_key(v.answer) for v in vs])
            row[name] = i is not None and vs[i].correct
        out.append(row)
    return out


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("score", args)  # flags, resume, task, accelerator, run dir (shared/run.py)
    args, accelerator, task = run.args, run.accelerator, run.task
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    instruction = P1 + ANSWER_FORMAT[args.task]
    needs_ref = args.beta1 > 0 or args.beta2 > 0 or args.offline_frac > 0
    lm = run.setup_lm(reference=needs_ref)  # π_ref: the frozen base model, the KL anchor of both stages
    model, tokenizer, optimizer, scheduler = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler
    step, stream = lm.state.get("step", 0), PromptStream(len(task.train), args.seed, lm.state.get("cursor", 0))
    gather = lambda x: accelerator.gather(x.to(device).float())  # noqa: E731

    before = evaluate_two_turn(run, lm, step, task.test, instruction) if step == 0 else None
    last_eval, cursor = before, stream.cursor  # `cursor`: the prompt stream after the last completed step
    bar = tqdm(total=args.total_steps, initial=step, desc="score", disable=not accelerator.is_main_process)
    try:
        # --token-budget (both turns, offline first answers included): checked before each rollout step; the
        # step that spends it is the last: evaluated (two-turn) and saved as the --total-steps one would be
        while step < args.total_steps and run.budget_left():
            stage = stage_of(step, args.stage1_steps, args.stage2_steps)
            t0 = time.time()  # an interrupted rollout is redone from `cursor` on resume
            model.eval()
            # 1. two-turn on-policy rollouts: y1 ~ π_θ(·|x1) (or the base model's, offline), y2 ~ π_θ(·|x1, y1, p1)
            problems = [task.train[i] for i in stream.take(args.batch_size)[rank::world]]
            prompts = [chat_prompt(tokenizer, p.prompt, task.system_prompt) for p in problems]
            n_off = round(args.offline_frac * len(problems))
            with lm.reference() if n_off else nullcontext() as base:
                ro1, ro2 = two_turn_rollout(model, base, tokenizer, prompts, instruction, n_offline=n_off,
                                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                            batch_size=args.gen_batch_size)
            ro1, ro2 = ro1.to(device), ro2.to(device)
            mask1 = ro1.completion_mask.clone()
            mask1[:n_off] = 0  # base-model first answers are context only: no turn-1 term (it would be off-policy)
            # 2. rewards (detached constants), the Stage II bonus (Eq. 5) and the optional baselines
            v1, v2 = verdicts(task, ro1, problems), verdicts(task, ro2, problems)
            r1, r2 = (train_reward(v, ro, args.grade_truncated).to(device) for v, ro in ((v1, ro1), (v2, ro2)))
            r2_shaped = shaped_turn2_reward(r1, r2, args.alpha)
            turn2 = r2 if stage == 1 else r2_shaped
            b1 = gather(r1[n_off:]).mean() if args.baseline and stage == 2 and len(r1) > n_off else 0.0
            b2 = gather(turn2).mean() if args.baseline else 0.0
            t_gen = time.time() - t0

            # 3. π_ref log-probs of the turns that carry a KL term (no gradient)
            beta_t1 = args.beta2 if stage == 1 else args.beta1
            turn1_trained = stage == 2 or beta_t1 > 0  # Stage I with β2 = 0 never differentiates y1
            rows, t1 = torch.arange(len(problems), device=device), time.time()
            ref1 = ref2 = None
            if beta_t1 > 0 or args.beta1 > 0:
                with lm.reference() as ref:
                    ref1 = rollout_logprobs(ref, ro1, rows, args.temperature, args.micro_batch_size) if beta_t1 > 0 else None
                    ref2 = rollout_logprobs(ref, ro2, rows, args.temperature, args.micro_batch_size) if args.beta1 > 0 else None
            t_ref = time.time() - t1

            # 4. one on-policy REINFORCE step on the stage's loss (micro-batches accumulate one batch's gradient)
            model.train()
            t2, sums = time.time(), {"loss": 0.0, "kl1": 0.0, "kl2": 0.0}
            with run.atomic():  # Ctrl-C / SIGTERM wait for the end of the update: no half-updated checkpoint
                micro_rows = rows.split(args.micro_batch_size)
                for k, m in enumerate(micro_rows):
                    with nullcontext() if k == len(micro_rows) - 1 else accelerator.no_sync(model):
                        logp1 = token_logprobs(model, ro1.prompt_ids[m], ro1.prompt_mask[m], ro1.completion_ids[m],
                                               ro1.completion_mask[m], temperature=args.temperature) if turn1_trained else None
                        logp2 = token_logprobs(model, ro2.prompt_ids[m], ro2.prompt_mask[m], ro2.completion_ids[m],
                                               ro2.completion_mask[m], temperature=args.temperature)
                        pick = lambda x: None if x is None else x[m]  # noqa: E731
                        common = (logp1, pick(ref1), mask1[m], logp2, pick(ref2), ro2.completion_mask[m])
                        if stage == 1:
                            loss, s = stage1_loss(*common, r2[m], beta1=args.beta1, beta2=args.beta2, b2=b2,
                                                  num_seqs=args.batch_size)
                        else:
                            loss, s = stage2_loss(*common, r1[m], r2_shaped[m], beta1=args.beta1, b1=b1, b2=b2,
                                                  num_seqs=args.batch_size)
                        accelerator.backward(loss * world)  # DDP averages; num_seqs is the global batch
                    sums["loss"] += loss.item()
                    sums["kl1"] += float(s.get("kl1", 0.0))
                    sums["kl2"] += float(s.get("kl2", 0.0))
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                t_update = time.time() - t2
                step, cursor = step + 1, stream.cursor

                # ---- logging (over every process)
                total = accelerator.reduce(torch.tensor([sums["loss"], sums["kl1"], sums["kl2"]], device=device), "sum")
                changed = gather(torch.tensor([answer_key(a.answer) != answer_key(b.answer) for a, b in zip(v1, v2)]))
                len1, len2 = gather(ro1.completion_mask.sum(1)), gather(ro2.completion_mask.sum(1))
                trunc = gather(torch.cat([ro1.truncated, ro2.truncated]))
                tokens = (len1.sum() + len2.sum()).item()
                sc = self_correction_metrics(gather(r1), gather(r2))  # on the training rewards r̂1, r̂2
                step_s = time.time() - t0
                metrics = {
                    "train/reward": gather(turn2).mean().item(), "train/accuracy": sc["acc_t2"],  # r̂2 or r̃2; r̂2
                    "train/format_rate": gather(torch.tensor([v.format_ok for v in v2])).mean().item(),
                    "train/loss": total[0].item(), "train/kl": (total[1] + total[2]).item(), "train/grad_norm": grad_norm,
                    "train/completion_len": len2.mean().item(), "train/truncated_frac": trunc.mean().item(),
                    "train/lr": scheduler.get_last_lr()[0], "score/stage": stage, "score/kl1": total[1].item(), "score/kl2": total[2].item(),
                    "score/acc_t1": sc["acc_t1"], "score/delta_i2c": sc["delta_i2c"], "score/delta_c2i": sc["delta_c2i"],
                    "score/changed_frac": changed.mean().item(), "score/len_t1": len1.mean().item(),
                    "perf/step_s": step_s, "perf/gen_s": t_gen, "perf/ref_s": t_ref, "perf/update_s": t_update,
                    "perf/tokens_per_s": tokens / step_s}
                run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(stage=stage, r1=f"{metrics['score/acc_t1']:.2f}", r2=f"{metrics['train/accuracy']:.2f}")
            last = step == args.total_steps or not run.budget_left()
            if last and step < args.total_steps:
                run.log(f"token budget spent after step {step}: {run.tokens_spent()} of {args.token_budget} tokens")
            if step % args.eval_every == 0 or last:
                last_eval = evaluate_two_turn(run, lm, step, task.test, instruction)
            if step % args.save_every == 0 or last:
                run.save(lm, step=step, cursor=cursor)
    except KeyboardInterrupt:
        run.save_on_interrupt(lm, f"step {step}", step=step, cursor=cursor)
        raise
    finally:
        bar.close()
        run.close()
    return run.summary(lm, before, last_eval)


if __name__ == "__main__":
    main(cli(Args))

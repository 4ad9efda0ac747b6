"""NFT — Negative-aware Fine-Tuning (and its RFT baseline, `--rft`).

Paper: Chen et al., "Bridging Supervised Learning and Reinforcement Learning in Math Reasoning",
arXiv:2505.18116 (ICLR 2026). Official code: NVlabs/NFT (`dp_actor.py`).

Idea: rejection-sampling fine-tuning (RFT) maximises the likelihood of the model's own correct
answers and throws the wrong ones away. NFT also learns from wrong answers, still by maximum
likelihood: the sampling policy is a mixture π_old = r_q π⁺ + (1 − r_q) π⁻ of its correct- and
wrong-answer conditionals. The trained model π_θ plays π⁺, and the negative policy is defined
implicitly, π_θ⁻ = (π_old − r_q π_θ)/(1 − r_q), then fit to the wrong answers. Raising π_θ⁻ on a
wrong answer lowers π_θ on it. One model, no reference model, no KL, no advantage.

    R_t   = π_θ(a_t | q, a_<t) / π_old(a_t | q, a_<t)                    token ratio, π_old detached
    r̂_q   = (1/K) Σ_k r^k                                                   correctness rate of the group
    L(θ)  = − Σ_{(q,a,r)} ω(q) Σ_t [ r log R_t + (1 − r) log max_v((1 − r̂_q R_t)/(1 − r̂_q), ε) ]   (Eq. 10)
    max_v(x, ε) = x + stopgrad(max(x, ε) − x)          forward value max(x, ε), gradient of x (straight-through)
    ω(q)  ∈ {1, 1 − r̂_q (default), √((1 − r̂_q)/r̂_q)}                    prompt weight (code `normalize` 0/1/2)

On-policy (R ≡ 1) the gradient of NFT with ω = √((1−r̂)/r̂) equals GRPO's with population-std
advantages, and with ω = 1 − r̂ it equals Dr. GRPO's (Props. 4.1–4.2); tests/test_nft.py checks both
against `algos/grpo.py`. Groups with r̂ ∈ {0, 1} carry no signal and are dropped (re-generating as
DAPO does). The loss value is 0 on-policy: watch `train/grad_norm` and accuracy, not `train/loss`.

Aggregation: a token sum divided by a constant C (the official code: C = 1000 per micro-batch; here
by default C = N·L_max, Dr. GRPO's constant, so `--loss-type constant` matches `algos/grpo.py`), or
`token_mean` (DAPO's token-level normalisation, which the paper says it keeps). The official code also
clamps log R_t at +10 before exp and r̂ to [0.02, 0.98] (inactive for K ≤ 50); both kept here.
Updates: as in the paper, each rollout is split into several mini-batches, one AdamW step each, so
only the first is on-policy and the later ones use R ≠ 1 (the regime where NFT differs from GRPO);
at this batch size (4 prompts × 8 answers) one group per mini-batch, 4 steps per rollout, against the
paper's 16 of 32 prompts. An answer cut off at L_max is wrong ("no final answer", §3 step 2).
Simplifications: none beyond the choice of C above and the mini-batch size.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/nft.py` finds `shared`

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import tyro
from tqdm.auto import tqdm

from shared.args import StepArgs, cli
from shared.logprobs import token_logprobs
from shared.rollouts import PromptStream, group_micro_batch, rollout_logprobs, sample_groups, shuffled_groups
from shared.run import Run


@dataclass
class Args(StepArgs):  # the experiment flags (--model, --task, --total-steps, ...) come from shared/args.py
    # ---- algorithm
    rft: bool = False
    """the paper's RFT baseline: negative answers get weight 0 and ω = 1 (pitfall 7)"""
    batch_size: int = 4
    """questions per rollout step (after dropping groups with r̂ ∈ {0, 1})"""
    group_size: int = 8
    """K: answers sampled per question"""
    weight_decay: float = 0.0
    """AdamW weight decay (0.1 in the paper)"""
    warmup_steps: int = 0
    """linear warm-up, in optimizer steps (10 in the paper)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    mini_batch_size: int | None = 8
    """sequences per optimizer step, in whole groups (None = the whole rollout: one on-policy update).
    The paper splits each rollout into 16 mini-batches of 32 prompts; at B = 4 prompts the closest is
    one group per mini-batch, 4 updates per rollout, so only the first is on-policy (pitfall 6)"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one process, in whole groups (each prompt runs once); no effect on the maths"""
    gen_batch_size: int | None = None
    """rows per `generate` call (None = all at once)"""
    max_gen_batches: int = 10
    """most generation batches per step while collecting groups with 0 < r̂ < 1"""
    grade_truncated: bool = False
    """grade an answer cut off at --max-new-tokens on its text (default: it is wrong, "no final answer")"""
    prompt_weight: Literal["one", "one_minus_r", "sqrt"] = "one_minus_r"
    """ω(q): 1, 1 − r̂ (paper default; ≡ Dr. GRPO on-policy) or √((1 − r̂)/r̂) (≡ GRPO on-policy)"""
    neg_weight: float = 1.0
    """weight of the negative term (1 = NFT, 0 = RFT; code `neg_weight`)"""
    epsilon: float = 1.0
    """ε in max_v(·, ε) of Eq. 10 (code `clamp_negative`, 1.0 in every main experiment)"""
    loss_type: Literal["constant", "token_mean"] = "constant"
    """token sum / C (official code) or / number of tokens (DAPO's token-level mean)"""
    loss_constant: float | None = None
    """C for `constant` (None = N·L_max of the mini-batch; the official code uses 1000)"""

    RULES: ClassVar[dict[str, str]] = {
        "batch_size": "> 0", "group_size": ">= 2; r̂ of a group of one is 0 or 1, which NFT drops",
        "weight_decay": ">= 0", "warmup_steps": ">= 0", "max_grad_norm": "> 0", "mini_batch_size": "> 0",
        "micro_batch_size": "> 0", "gen_batch_size": "> 0", "max_gen_batches": ">= 1", "neg_weight": ">= 0",
        "epsilon": "> 0; log max_v(·, ε) needs ε > 0", "loss_constant": "> 0"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # questions are split across processes


# ------------------------------------------------------------------------------------ ALGO LOGIC
def straight_through_max(x: torch.Tensor, eps: float) -> torch.Tensor:
    """max_v(x, ε) of Eq. 10: the value of max(x, ε) with the gradient of x (pitfall 1)."""
    return x + (torch.clamp(x, min=eps) - x).detach()


def prompt_weights(rhat: torch.Tensor, kind: str) -> torch.Tensor:
    """ω(q) from the group correctness rate r̂ (code `normalize` = 0, 1, 2)."""
    if kind == "one":
        return torch.ones_like(rhat)
    if kind == "one_minus_r":
        return 1 - rhat
    if kind == "sqrt":
        return torch.sqrt((1 - rhat) / rhat)
    raise ValueError(f"unknown prompt weight {kind!r}")


def negative_ratio(ratio: torch.Tensor, rhat: torch.Tensor) -> torch.Tensor:
    """π_θ⁻ / π_old = (1 − r̂ R) / (1 − r̂): the implicit negative policy's ratio (the argument of max_v in Eq. 10)."""
    return (1 - rhat * ratio) / (1 - rhat)


def nft_loss(logp, old_logp, correct, rhat, omega, mask, *, eps=1.0, neg_weight=1.0, loss_type="constant",
             normaliser=None):
    """Eq. 10. logp [N, T] carries the gradient; old_logp [N, T] detached; correct [N] 0/1 labels;
    rhat, omega [N] (each answer carries its group's r̂ and ω); mask [N, T] 1 on answer tokens.

    `normaliser` is the denominator over the whole mini-batch (all micro-batches and processes):
    C for `constant`, the token count for `token_mean`; default: this batch's token count.
    """
    mask = mask.to(logp.dtype)
    log_ratio = torch.clamp(logp - old_logp, max=10.0)  # official code: log R clamped at +10
    ratio = torch.exp(log_ratio)  # R_t
    r = rhat.to(logp.dtype).unsqueeze(1)
    pos = -log_ratio  # −log R_t: maximum likelihood on correct answers
    proxy = negative_ratio(ratio, r)
    neg = -torch.log(straight_through_max(proxy, eps))  # −log max_v(·, ε)
    c = correct.to(logp.dtype).unsqueeze(1)
    per_token = omega.to(logp.dtype).unsqueeze(1) * (c * pos + neg_weight * (1 - c) * neg)
    normaliser = mask.sum().clamp(min=1) if normaliser is None else normaliser
    loss = (per_token * mask).sum() / normaliser
    with torch.no_grad():
        neg_mask, pos_mask = mask * (1 - c), mask * c
        stats = {"pos_loss": (per_token * pos_mask).sum() / normaliser,
                 "neg_loss": (per_token * neg_mask).sum() / normaliser,
                 "proxy_clip_frac": ((proxy < eps).to(mask.dtype) * neg_mask).sum() / neg_mask.sum().clamp(min=1)}
    return loss, stats


def group_rate(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """r̂_q for every answer: the mean 0/1 label of its group of K (clamped to [0.02, 0.98] as the code)."""
    rate = correct.view(-1, group_size).mean(dim=1, keepdim=True).expand(-1, group_size)
    return rate.flatten().clamp(0.02, 0.98)


def informative_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """Keep a group only if 0 < r̂ < 1 (§4 step 3; pitfall 3)."""
    n = correct.view(-1, group_size).sum(dim=1)
    return (n > 0) & (n < group_size)


# ------------------------------------------------------------------------------------ main
def rft_preset(args: Args) -> Args:
    """The paper's RFT: positives only, unweighted."""
    return dataclasses.replace(args, neg_weight=0.0, prompt_weight="one") if args.rft else args


def main(args: Args) -> dict:
    algo = "rft" if args.rft else "nft"
    run = Run("nft", args, presets=rft_preset, label=algo)  # flags, resume, task, accelerator, run dir
    args, accelerator, task = run.args, run.accelerator, run.task
    world, device = accelerator.num_processes, accelerator.device
    lm = run.setup_lm(weight_decay=args.weight_decay, warmup_steps=args.warmup_steps)
    model, tokenizer, optimizer, scheduler = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler
    step, stream = lm.state.get("step", 0), PromptStream(len(task.train), args.seed, lm.state.get("cursor", 0))

    before = run.evaluate(lm, step, args.max_new_tokens) if step == 0 else None
    last_eval, cursor = before, stream.cursor  # `cursor`: the prompt stream after the last completed step
    bar = tqdm(total=args.total_steps, initial=step, desc=algo, disable=not accelerator.is_main_process)
    try:
        # --token-budget: checked before each rollout step (a DAPO/NFT step's re-generations included), the
        # step that spends it is the last: evaluated and saved as the --total-steps one would be
        while step < args.total_steps and run.budget_left():
            t0 = time.time()  # an interrupted rollout is redone from `cursor` on resume
            model.eval()
            # 1–3. sample K answers per question, verify, keep groups with 0 < r̂ < 1
            generated = sample_groups(
                accelerator, model, tokenizer, task, stream, batch_size=args.batch_size, group_size=args.group_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, gen_batch_size=args.gen_batch_size,
                keep=lambda c: informative_groups(c, args.group_size), max_gen_batches=args.max_gen_batches,
                grade_truncated=args.grade_truncated)
            # too few kept groups after max_gen_batches: train on rejected ones too (zero advantage;
            # every process needs the same batch size), logged as dropped_frac / gen_batches
            groups = generated.take(args.batch_size // world, fill_with_rejected=True)
            ro, correct = groups.rollout.to(device), groups.correct.to(device)
            t_gen = time.time() - t0
            # 4. r̂ and ω per group; 5. π_old log-probs once (with one on-policy update: logp.detach())
            rhat = group_rate(correct, args.group_size)
            # groups with r̂ ∈ {0, 1} only remain if generation ran out of tries: ω = 0 removes them
            informative = informative_groups(correct, args.group_size).repeat_interleave(args.group_size)
            omega = prompt_weights(rhat, args.prompt_weight) * informative
            n_local = correct.shape[0]
            mini = (args.mini_batch_size or n_local * world) // world
            on_policy = mini >= n_local
            micro = group_micro_batch(args.micro_batch_size, args.group_size)  # rows per forward pass: whole groups
            old_logp = None if on_policy else rollout_logprobs(
                model, ro, torch.arange(n_local, device=device), args.temperature, micro)

            # 6. one epoch of mini-batch updates with the NFT loss
            model.train()
            t2, sums = time.time(), {"loss": 0.0, "pos": 0.0, "neg": 0.0, "clip": 0.0, "grad_norm": 0.0, "n": 0}
            with run.atomic():  # Ctrl-C / SIGTERM wait for the end of the update: no half-updated checkpoint
                # mini-batches of whole groups, in a shuffled order (the code splits by prompts)
                for rows in shuffled_groups(n_local, args.group_size, device).split(mini):
                    if args.loss_type == "constant":
                        normaliser = args.loss_constant or len(rows) * world * args.max_new_tokens
                    else:
                        normaliser = accelerator.reduce(ro.completion_mask[rows].sum(), reduction="sum").clamp(min=1)
                    micro_rows = rows.split(micro)
                    for k, mrows in enumerate(micro_rows):
                        sync = nullcontext() if k == len(micro_rows) - 1 else accelerator.no_sync(model)
                        with sync:
                            logp = token_logprobs(model, ro.prompt_ids[mrows], ro.prompt_mask[mrows],
                                                  ro.completion_ids[mrows], ro.completion_mask[mrows],
                                                  temperature=args.temperature)
                            old = logp.detach() if old_logp is None else old_logp[mrows]
                            loss, s = nft_loss(logp, old, correct[mrows], rhat[mrows], omega[mrows],
                                               ro.completion_mask[mrows], eps=args.epsilon, neg_weight=args.neg_weight,
                                               loss_type=args.loss_type, normaliser=normaliser)
                            accelerator.backward(loss * world)  # DDP averages; the normaliser is global
                        sums["loss"] += loss.item() * world
                        sums["pos"] += s["pos_loss"].item() * world
                        sums["neg"] += s["neg_loss"].item() * world
                        sums["clip"] += s["proxy_clip_frac"].item() * len(mrows) / len(rows)
                    sums["grad_norm"] += float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    sums["n"] += 1
                t_update = time.time() - t2
                step, cursor = step + 1, stream.cursor

                # ---- logging (means over every process)
                g = lambda x: accelerator.gather_for_metrics(x.to(device).float())  # noqa: E731
                all_correct, all_fmt = g(correct), g(groups.formatted)
                tokens = accelerator.reduce(ro.completion_mask.sum(), reduction="sum").item()
                n, step_s = sums.pop("n"), time.time() - t0
                metrics = {
                    "train/reward": all_correct.mean().item(), "train/accuracy": all_correct.mean().item(),  # kept groups
                    "train/format_rate": all_fmt.mean().item(), "train/loss": sums["loss"] / n,
                    "train/grad_norm": sums["grad_norm"] / n, "train/completion_len": tokens / max(all_correct.numel(), 1),
                    "train/truncated_frac": g(ro.truncated).mean().item(), "train/lr": scheduler.get_last_lr()[0],
                    "nft/pos_loss": sums["pos"] / n, "nft/neg_loss": sums["neg"] / n, "nft/proxy_clip_frac": sums["clip"] / n,
                    "nft/neg_weight": args.neg_weight, "nft/rhat": g(rhat).mean().item(),
                    "nft/dropped_frac": groups.dropped_frac, "nft/raw_accuracy": groups.raw_accuracy, "nft/gen_batches": groups.gen_batches,
                    "perf/step_s": step_s, "perf/gen_s": t_gen, "perf/update_s": t_update, "perf/tokens_per_s": tokens / step_s}
                run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(acc=f"{metrics['train/accuracy']:.2f}", gnorm=f"{metrics['train/grad_norm']:.2f}")
            last = step == args.total_steps or not run.budget_left()
            if last and step < args.total_steps:
                run.log(f"token budget spent after step {step}: {run.tokens_spent()} of {args.token_budget} tokens")
            if step % args.eval_every == 0 or last:
                last_eval = run.evaluate(lm, step, args.max_new_tokens)
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

"""GRPO — Group Relative Policy Optimization, with the Dr. GRPO and DAPO variants as flags.

Paper: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
Models", arXiv:2402.03300, §4.1 and App. A.1.6. Variants: Liu et al., "Understanding R1-Zero-Like
Training: A Critical Perspective" (Dr. GRPO), arXiv:2503.20783; Yu et al., "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale", arXiv:2503.14476.

Idea: PPO without a value network. Sample a group of G answers per question from the current
policy, score them with a verifier, and use each reward standardised within its group as the
advantage of every token of that answer. The group mean is the baseline; no critic is trained.

    Â_i     = (r_i − mean(r)) / (std(r) + δ)                        (§4.1.2; Dr. GRPO: no std)
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})
    s_{i,t} = min(ρ Â_i, clip(ρ, 1 − ε_low, 1 + ε_high) Â_i)           (Eq. 3; DAPO: ε_high > ε_low)
    D_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1                        (Eq. 4, the "k3" estimator, ≥ 0)
    J(θ)    = (1/G) Σ_i (1/|o_i|) Σ_t [s_{i,t} − β D_{i,t}]         (Eq. 3; maximised)

Aggregations of the per-token loss −s + βD (`--loss-type`):
    seq_mean_token_mean  (1/N) Σ_i (1/|o_i|) Σ_t     DeepSeekMath Eq. 3
    token_mean           Σ_{i,t} / Σ_i |o_i|          DAPO Eq. 8
    constant             Σ_{i,t} / (N · L_max)        Dr. GRPO

DAPO also drops groups whose answers are all right or all wrong (dynamic sampling, re-generating
until B mixed groups exist) and shapes rewards of too-long answers (soft overlong punishment, Eq. 13)
or masks truncated answers out of the loss (overlong filtering).

Simplifications: the reward is a rule verifier (DeepSeekMath trained a reward model), 1/0 for GRPO and
Dr. GRPO and ±1 for DAPO (whose Eq. 13 penalty is added to ±1); an answer cut off at L_max is wrong
(Dr. GRPO's rule; `--grade-truncated` grades its text); one outer iteration (π_ref is the initial
policy, Alg. 1 with I = 1). Std is Bessel-corrected (as TRL/verl) by
default; `--adv-std population` gives the population std used in NFT's equivalence proof.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/grpo.py` finds `shared`

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
    variant: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """preset for the fields below left at None: DeepSeekMath GRPO, Dr. GRPO, or DAPO"""
    batch_size: int = 4
    """B: questions per rollout step"""
    group_size: int = 8
    """G: answers sampled per question"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up, in optimizer steps"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    num_iterations: int = 1
    """μ: optimisation epochs over each rollout batch (1 in all three papers)"""
    mini_batch_size: int | None = None
    """sequences per optimizer step, whole groups in random order (None = the whole rollout: one on-policy update)"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one process, in whole groups (each prompt runs once); no effect on the maths"""
    gen_batch_size: int | None = None
    """rows per `generate` call (None = all at once)"""
    beta: float | None = None
    """β: k3 KL coefficient (GRPO 0.04; 0 skips the reference model)"""
    epsilon: float = 0.2
    """ε_low: lower clip range of ρ"""
    epsilon_high: float | None = None
    """ε_high: upper clip range (GRPO/Dr. GRPO 0.2 = ε; DAPO clip-higher 0.28)"""
    loss_type: Literal["seq_mean_token_mean", "token_mean", "constant"] | None = None
    """aggregation of per-token losses (see the module docstring)"""
    adv_std: Literal["unbiased", "population", "none"] | None = None
    """std in Â's denominator (GRPO: unbiased; Dr. GRPO: none)"""
    adv_eps: float = 1e-4
    """δ added to the std (TRL's value)"""
    dynamic_sampling: bool | None = None
    """DAPO: keep only groups with mixed correctness, re-generating until B such groups"""
    max_gen_batches: int = 10
    """DAPO: most generation batches per step for dynamic sampling"""
    overlong: Literal["none", "filter", "soft"] | None = None
    """DAPO: truncated answers masked out (`filter`) or shaped reward (`soft`, Eq. 13)"""
    overlong_cache: int | None = None
    """L_cache of the soft overlong punishment (default max_new_tokens // 4)"""
    reward: Literal["binary", "signed"] | None = None
    """correctness reward: 1/0 (GRPO with a rule verifier, Dr. GRPO) or ±1 (DAPO, which adds Eq. 13 to it)"""
    grade_truncated: bool = False
    """grade an answer cut off at --max-new-tokens on its text (default: it is wrong, as in Dr. GRPO)"""

    RULES: ClassVar[dict[str, str]] = {
        "batch_size": "> 0", "group_size": ">= 2; a group of one has zero advantage", "weight_decay": ">= 0", "warmup_steps": ">= 0",
        "max_grad_norm": "> 0", "num_iterations": ">= 1", "mini_batch_size": "> 0", "micro_batch_size": "> 0",
        "gen_batch_size": "> 0", "beta": ">= 0", "epsilon": "[0, 1]", "epsilon_high": ">= 0", "adv_eps": ">= 0",
        "max_gen_batches": ">= 1", "overlong_cache": ">= 0"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)  # questions are split across processes


VARIANTS = {  # the fields a variant sets when they are left at None (GRPO and Dr. GRPO: ε_high = ε)
    "grpo": dict(beta=0.04, loss_type="seq_mean_token_mean", adv_std="unbiased", dynamic_sampling=False,
                 overlong="none", reward="binary"),
    "dr_grpo": dict(beta=0.0, loss_type="constant", adv_std="none", dynamic_sampling=False, overlong="none",
                    reward="binary"),
    "dapo": dict(beta=0.0, epsilon_high=0.28, loss_type="token_mean", adv_std="unbiased", dynamic_sampling=True,
                 overlong="soft", reward="signed"),
}


def resolve_variant(args: Args) -> Args:
    filled = {k: v for k, v in VARIANTS[args.variant].items() if getattr(args, k) is None}
    if args.epsilon_high is None and "epsilon_high" not in filled:  # a symmetric clip follows --epsilon
        filled["epsilon_high"] = args.epsilon
    if args.overlong_cache is None:
        filled["overlong_cache"] = args.max_new_tokens // 4
    return dataclasses.replace(args, **filled)


# ------------------------------------------------------------------------------------ ALGO LOGIC
def group_advantages(rewards: torch.Tensor, group_size: int, std: str = "unbiased",
                     eps: float = 1e-4) -> torch.Tensor:
    """Â_i = (r_i − mean(r)) / (std(r) + δ) within each group of G consecutive answers (§4.1.2).

    `std="none"` is Dr. GRPO's Â_i = r_i − mean(r). A group with equal rewards gets Â = 0.
    """
    r = rewards.view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if std != "none":
        sigma = r.std(dim=1, keepdim=True, unbiased=(std == "unbiased"))
        centred = torch.where(sigma > 0, centred / (sigma + eps), torch.zeros_like(centred))  # never 0/0
    return centred.flatten()


def correctness_reward(correct: torch.Tensor, kind: str) -> torch.Tensor:
    """1/0 (`binary`) or ±1 (`signed`, DAPO). The scale cancels under std normalisation, but not against
    Eq. 13's length penalty (which DAPO adds to ±1) nor without std (Dr. GRPO), so each paper's is kept."""
    return correct.clone() if kind == "binary" else 2 * correct - 1


def mixed_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling (Eq. 11): a group is kept only if 0 < #correct < G."""
    n_correct = correct.view(-1, group_size).sum(dim=1)
    return (n_correct > 0) & (n_correct < group_size)


def soft_overlong_penalty(lengths: torch.Tensor, max_len: int, cache: int) -> torch.Tensor:
    """DAPO Eq. 13: 0 up to L_max − L_cache, then a linear ramp to −1 at L_max, −1 beyond."""
    free = max_len - cache
    ramp = (free - lengths.float()) / max(cache, 1)
    return torch.where(lengths <= free, torch.zeros_like(ramp), ramp.clamp(min=-1.0))


def grpo_loss(logp, old_logp, ref_logp, adv, mask, *, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="seq_mean_token_mean", num_seqs=None, num_tokens=None, max_len=None):
    """Per-token loss −s_{i,t} + β D_{i,t} (Eq. 3–4), aggregated by `loss_type`.

    logp [N, T] carries the gradient; old_logp / ref_logp are detached ([N, T]; ref_logp may be None
    when β = 0); adv [N]; mask [N, T] is 1 on answer tokens (EOS included). `num_seqs`, `num_tokens`
    are the normalisers of the whole mini-batch (all micro-batches and processes; default: this
    batch), so summing the losses of micro-batches gives the loss of the mini-batch (pitfall 10).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # ρ: gradient flows through the numerator even when ρ == 1
    a = adv.to(logp.dtype).unsqueeze(1)
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -torch.min(unclipped, clipped)  # pessimistic bound: A>0 clipped above, A<0 below
    stats = {}
    if beta > 0:
        log_q = ref_logp - logp
        kl = torch.exp(log_q) - log_q - 1  # k3 (Eq. 4); ∂D/∂logp = 1 − π_ref/π_θ
        per_token = per_token + beta * kl
        stats["kl"] = ((kl * mask).sum() / mask.sum().clamp(min=1)).detach()

    num_seqs = logp.shape[0] if num_seqs is None else num_seqs
    if loss_type == "seq_mean_token_mean":  # DeepSeekMath: mean over tokens, then over answers
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_seqs
    elif loss_type == "token_mean":  # DAPO: every token of the mini-batch weighs the same
        num_tokens = mask.sum() if num_tokens is None else num_tokens
        loss = (per_token * mask).sum() / max(float(num_tokens), 1.0)
    elif loss_type == "constant":  # Dr. GRPO: a constant normaliser, no length bias
        loss = (per_token * mask).sum() / (num_seqs * max_len)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    with torch.no_grad():
        active = ((a > 0) & (ratio > 1 + eps_high)) | ((a < 0) & (ratio < 1 - eps_low))
        stats["clip_frac"] = (active.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("grpo", args, presets=resolve_variant)  # flags, resume, task, accelerator, run dir (shared/run.py)
    args, accelerator, task = run.args, run.accelerator, run.task
    world, device = accelerator.num_processes, accelerator.device
    lm = run.setup_lm(reference=args.beta > 0, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps)
    model, tokenizer, optimizer, scheduler = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler
    step, stream = lm.state.get("step", 0), PromptStream(len(task.train), args.seed, lm.state.get("cursor", 0))

    before = run.evaluate(lm, step, args.max_new_tokens) if step == 0 else None
    last_eval, cursor = before, stream.cursor  # `cursor`: the prompt stream after the last completed step
    bar = tqdm(total=args.total_steps, initial=step, desc="grpo", disable=not accelerator.is_main_process)
    try:
        # --token-budget: checked before each rollout step (a DAPO/NFT step's re-generations included), the
        # step that spends it is the last: evaluated and saved as the --total-steps one would be
        while step < args.total_steps and run.budget_left():
            t0 = time.time()  # an interrupted rollout is redone from `cursor` on resume
            model.eval()
            generated = sample_groups(
                accelerator, model, tokenizer, task, stream, batch_size=args.batch_size, group_size=args.group_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, gen_batch_size=args.gen_batch_size,
                keep=(lambda c: mixed_groups(c, args.group_size)) if args.dynamic_sampling else None,
                max_gen_batches=args.max_gen_batches, grade_truncated=args.grade_truncated)
            # too few kept groups after max_gen_batches: train on rejected ones too (zero advantage;
            # every process needs the same batch size), logged as dropped_frac / gen_batches
            groups = generated.take(args.batch_size // world, fill_with_rejected=True)
            ro, correct, formatted = groups.rollout.to(device), groups.correct, groups.formatted
            rewards = correctness_reward(correct, args.reward)
            if args.overlong == "soft":  # DAPO Eq. 13, added to the ±1 correctness reward
                rewards += soft_overlong_penalty(ro.completion_mask.sum(1).cpu(), args.max_new_tokens, args.overlong_cache)
            elif args.overlong == "filter":  # DAPO overlong filtering: truncated answers carry no gradient
                ro.completion_mask[ro.truncated] = 0
            t_gen = time.time() - t0
            adv = group_advantages(rewards, args.group_size, args.adv_std, args.adv_eps).to(device)
            n_local = adv.shape[0]
            mini = (args.mini_batch_size or n_local * world) // world
            all_rows = torch.arange(n_local, device=device)
            micro = group_micro_batch(args.micro_batch_size, args.group_size)  # rows per forward pass: whole groups

            # π_old log-probs once per rollout; with a single on-policy update they equal logp.detach()
            t1 = time.time()
            on_policy = args.num_iterations == 1 and mini >= n_local
            old_logp = None if on_policy else rollout_logprobs(model, ro, all_rows, args.temperature, micro)
            ref_logp = None
            if args.beta > 0:  # π_ref: the frozen initial policy (with LoRA: the adapter disabled)
                with lm.reference() as ref:
                    ref_logp = rollout_logprobs(ref, ro, all_rows, args.temperature, micro)
            t_ref = time.time() - t1  # π_old (off-policy only) and π_ref forward passes

            # μ epochs × mini-batches; every mini-batch is one optimizer step (Alg. 1, step 6)
            model.train()
            t2, sums = time.time(), {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "n": 0}
            with run.atomic():  # Ctrl-C / SIGTERM wait for the end of the update: no half-updated checkpoint
                for _ in range(args.num_iterations):
                    for rows in shuffled_groups(n_local, args.group_size, device).split(mini):
                        num_tokens = accelerator.reduce(ro.completion_mask[rows].sum(), reduction="sum")
                        micro_rows = rows.split(micro)
                        for k, mrows in enumerate(micro_rows):
                            sync = nullcontext() if k == len(micro_rows) - 1 else accelerator.no_sync(model)
                            with sync:
                                logp = token_logprobs(model, ro.prompt_ids[mrows], ro.prompt_mask[mrows],
                                                      ro.completion_ids[mrows], ro.completion_mask[mrows],
                                                      temperature=args.temperature)
                                loss, s = grpo_loss(
                                    logp, logp.detach() if old_logp is None else old_logp[mrows],
                                    None if ref_logp is None else ref_logp[mrows], adv[mrows],
                                    ro.completion_mask[mrows], eps_low=args.epsilon, eps_high=args.epsilon_high,
                                    beta=args.beta, loss_type=args.loss_type, num_seqs=len(rows) * world,
                                    num_tokens=num_tokens, max_len=args.max_new_tokens)
                                accelerator.backward(loss * world)  # DDP averages; the normalisers are global
                            sums["loss"] += loss.item() * world
                            w = len(mrows) / len(rows)
                            sums["kl"] += float(s.get("kl", 0.0)) * w
                            sums["clip_frac"] += float(s["clip_frac"]) * w
                        sums["grad_norm"] += float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                        sums["n"] += 1
                t_update = time.time() - t2
                step, cursor = step + 1, stream.cursor

                # ---- logging (means over every process)
                g = lambda x: accelerator.gather_for_metrics(x.to(device).float())  # noqa: E731
                all_rewards, all_correct, all_fmt = g(rewards), g(correct), g(formatted)
                tokens = accelerator.reduce(ro.completion_mask.sum(), reduction="sum").item()
                n = sums.pop("n")
                step_s = time.time() - t0
                metrics = {
                    "train/reward": all_rewards.mean().item(), "train/reward_std": all_rewards.std().item(),
                    "train/accuracy": all_correct.mean().item(), "train/format_rate": all_fmt.mean().item(),
                    "train/loss": sums["loss"] / n, "train/kl": sums["kl"] / n, "grpo/clip_frac": sums["clip_frac"] / n,
                    "train/grad_norm": sums["grad_norm"] / n, "train/completion_len": tokens / max(all_rewards.numel(), 1),
                    "train/lr": scheduler.get_last_lr()[0], "perf/step_s": step_s, "perf/gen_s": t_gen,
                    "perf/ref_s": t_ref, "perf/update_s": t_update, "perf/tokens_per_s": tokens / step_s,
                    "grpo/zero_std_frac": 1 - mixed_groups(all_correct.cpu(), args.group_size).float().mean().item(),
                    "grpo/gen_batches": groups.gen_batches, "grpo/dropped_frac": groups.dropped_frac,
                    "train/truncated_frac": g(ro.truncated).mean().item()}
                run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['train/reward']:.2f}", acc=f"{metrics['train/accuracy']:.2f}")
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

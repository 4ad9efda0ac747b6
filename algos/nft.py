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
Simplifications: none beyond the choice of C above.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/nft.py` finds `shared`

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm.auto import tqdm

from shared.logprobs import token_logprobs
from shared.models import DEFAULT_MODEL, load_model
from shared.rollouts import PromptStream, rollout_logprobs, sample_groups
from shared.run import Run, seed_everything
from shared.tasks import load_task


@dataclass
class Args:
    # ---- experiment
    model: str = DEFAULT_MODEL
    """model name, local path, or `tiny` (a random test model built in code)"""
    task: str = "arith"
    """`arith`, `countdown` (built in, offline) or an HF dataset name: `gsm8k`, `math500`, `countdown-hf`"""
    level: int = 1
    """difficulty level of a built-in task (arith 1 = two-digit addition)"""
    seed: int = 0
    """seed of the task split, the model init (`tiny`), sampling and shuffling"""
    output_dir: str = "runs"
    """runs land in `{output_dir}/nft__{task}__{seed}__{time}/` (`rft__...` with --rft)"""
    resume: str | None = None
    """run directory to resume from its `checkpoint/` (its args.json is reused; flags you pass override)"""
    track: bool = False
    """also log to TensorBoard in the run directory"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project"""
    total_steps: int = 12
    """number of rollout steps"""
    eval_every: int = 6
    """greedy held-out evaluation every this many steps (and always before and after training)"""
    save_every: int = 6
    """checkpoint every this many steps (and at the end, and on Ctrl-C)"""
    n_train: int = 2000
    """training problems drawn from the task"""
    n_test: int = 200
    """held-out problems for evaluation"""
    lora_r: int = 0
    """LoRA rank (0 = full fine-tuning)"""
    load_in_4bit: bool = False
    """4-bit base weights through bitsandbytes (CUDA only; needs --lora-r)"""
    load_in_8bit: bool = False
    """8-bit base weights through bitsandbytes (CUDA only; needs --lora-r)"""

    # ---- algorithm
    rft: bool = False
    """the paper's RFT baseline: negative answers get weight 0 and ω = 1 (pitfall 7)"""
    batch_size: int = 4
    """questions per rollout step (after dropping groups with r̂ ∈ {0, 1})"""
    group_size: int = 8
    """K: answers sampled per question"""
    max_new_tokens: int = 24
    """generation budget per answer (L_max)"""
    temperature: float = 1.0
    """sampling temperature; log-probs use logits / T"""
    lr: float = 1e-5
    """AdamW learning rate (1e-6 in the paper at 7B/32B; 1e-5 suits a 135M model)"""
    weight_decay: float = 0.0
    """AdamW weight decay (0.1 in the paper)"""
    warmup_steps: int = 0
    """linear warm-up, in optimizer steps (10 in the paper)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    mini_batch_size: int | None = None
    """sequences per optimizer step (None = the whole rollout; the paper: 16 mini-batches per rollout)"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one process (gradient accumulation; no effect on the maths)"""
    gen_batch_size: int | None = None
    """rows per `generate` call (None = all at once)"""
    max_gen_batches: int = 10
    """most generation batches per step while collecting groups with 0 < r̂ < 1"""
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
    proxy = (1 - r * ratio) / (1 - r)  # π_θ⁻ / π_old of the implicit negative policy
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
def main(args: Args) -> dict:
    run = Run("rft" if args.rft else "nft", args, Args)  # accelerator, run dir, metrics (shared/run.py)
    args, accelerator, log = run.args, run.accelerator, run.log
    if args.rft:  # the paper's RFT: positives only, unweighted
        args = dataclasses.replace(args, neg_weight=0.0, prompt_weight="one")
    algo = "rft" if args.rft else "nft"
    world, device = accelerator.num_processes, accelerator.device
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if (args.load_in_4bit or args.load_in_8bit) and not args.lora_r:
        raise SystemExit("--load-in-4bit/8bit quantises frozen weights: pass --lora-r too")

    seed_everything(args.seed)
    model, tokenizer = load_model(args.model, device=device, lora_r=args.lora_r, seed=args.seed, log=log,
                                  load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit)
    task = load_task(args.task, seed=args.seed, n_train=args.n_train, n_test=args.n_test, level=args.level)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(args.warmup_steps, 1)))
    model, optimizer = accelerator.prepare(model, optimizer)  # not the scheduler: accelerate would step it per process
    state = run.restore(model, optimizer, scheduler)
    step, stream = state.get("step", 0), PromptStream(len(task.train), args.seed, state.get("cursor", 0))

    def checkpoint(cursor):  # `cursor`: where the prompt stream stood after the last completed step
        run.save(model, tokenizer, optimizer, scheduler, step=step, cursor=cursor)

    before = run.evaluate(model, tokenizer, task, step, args.max_new_tokens) if step == 0 else None
    last_eval = before
    bar = tqdm(total=args.total_steps, initial=step, desc=algo, disable=not accelerator.is_main_process)
    try:
        while step < args.total_steps:
            t0, cursor = time.time(), stream.cursor  # an interrupted step is redone from here on resume
            model.eval()
            # 1–3. sample K answers per question, verify, keep groups with 0 < r̂ < 1
            groups = sample_groups(
                accelerator, model, tokenizer, task, stream, batch_size=args.batch_size, group_size=args.group_size,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, gen_batch_size=args.gen_batch_size,
                keep=lambda c: informative_groups(c, args.group_size), max_gen_batches=args.max_gen_batches)
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
            old_logp = None if on_policy else rollout_logprobs(
                model, ro, torch.arange(n_local, device=device), args.temperature, args.micro_batch_size)

            # 6. one epoch of mini-batch updates with the NFT loss
            model.train()
            t2, sums = time.time(), {"loss": 0.0, "pos": 0.0, "neg": 0.0, "clip": 0.0, "grad_norm": 0.0, "n": 0}
            for rows in torch.randperm(n_local, device=device).split(mini):
                if args.loss_type == "constant":
                    normaliser = args.loss_constant or len(rows) * world * args.max_new_tokens
                else:
                    normaliser = accelerator.reduce(ro.completion_mask[rows].sum(), reduction="sum").clamp(min=1)
                micro_rows = rows.split(args.micro_batch_size)
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
            step += 1

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
            if step % args.eval_every == 0 or step == args.total_steps:
                last_eval = run.evaluate(model, tokenizer, task, step, args.max_new_tokens)
            cursor = stream.cursor
            if step % args.save_every == 0 or step == args.total_steps:
                checkpoint(cursor)
    except KeyboardInterrupt:
        log(f"\ninterrupted after step {step}: saving a checkpoint; continue with --resume {run.dir}")
        checkpoint(cursor)
        raise
    finally:
        bar.close()
        run.logger.close()
    if before is not None:
        log(f"held-out greedy accuracy: before {before['accuracy']:.3f}, after {last_eval['accuracy']:.3f}")
    log(f"run directory: {run.dir}")
    return {"run_dir": str(run.dir), "before": before, "after": last_eval, "policy": accelerator.unwrap_model(model)}


if __name__ == "__main__":
    main(tyro.cli(Args))

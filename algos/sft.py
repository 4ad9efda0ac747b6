"""SFT — supervised fine-tuning on the task's reference answers: the baseline beside every
self-improvement method (the benchmark of issue 20).

Paper: the fine-tuning baseline of Cobbe et al., "Training Verifiers to Solve Math Word Problems",
arXiv:2110.14168, §4 ("finetuning"): maximise the likelihood of the training set's reference
solutions, the loss taken on the solution tokens only.

Idea: no sampling, no reward, no verifier at training time. Each training problem comes with a
reference answer written by the task (for `multistep`: the steps, then "Answer: N"); the model is
trained by teacher forcing to write it after the prompt, ending with EOS so that it learns to stop.
Self-improvement methods must beat this to show that learning from their own samples pays off.

    x_i = chat_prompt(problem.prompt)      the chat-templated prompt, exactly as evaluation renders it
    y_i = reference answer + EOS           (REFERENCES below; tokenized on its own, as `generate` emits it)
    L(θ) = − (1 / Σ_i |y_i|) Σ_i Σ_t log π_θ(y_{i,t} | x_i, y_{i,<t})     token-mean cross-entropy

Prompt and padding tokens are masked out of the loss. The training order is a seeded, resumable
epoch-wise permutation of the train split (`PromptStream`), `--batch-size` problems per step.

Token budget: SFT generates nothing. Under `--token-budget` it counts the reference-answer tokens it
trains on (EOS included, `count_generated`), each time a batch is used: the tokens an RL method
would have had to generate to see them. Before each step the loop checks `run.budget_left()`; once
the count reaches the budget the run ends as after its last step (test-split evaluation and
checkpoint), having overshot by at most one batch.

Simplifications: none beyond the choice of reference texts (REFERENCES: GSM8K's calculator
annotations are dropped and its "#### N" line is written as the "Answer: N" the prompt asks for).
Tasks without reference solutions (math500, countdown-hf) are refused with a usage error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python algos/sft.py` finds `shared`

import re
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.args import StepArgs, cli, require
from shared.models import chat_prompt
from shared.rollouts import PromptStream
from shared.run import Run
from shared.sampling import count_generated

# The text the model learns to write for a problem of each task: the format the prompt asks for.
REFERENCES = {
    "arith": lambda p: p.answer,  # "Give only the final number."
    "multistep": lambda p: p.meta["solution"],  # one calculation per line, then "Answer: N"
    "countdown": lambda p: "Answer: " + p.meta["solution"],  # the equation on an "Answer:" line
    "gsm8k": lambda p: re.sub(r"<<[^>]*>>", "", p.meta["solution"].rsplit("####", 1)[0]).strip() + f"\nAnswer: {p.answer}",
}


@dataclass
class Args(StepArgs):  # the experiment flags (--model, --task, --total-steps, ...) come from shared/args.py
    # ---- algorithm
    lr: float = 2e-5
    """AdamW learning rate (TRL's SFT default; suits full fine-tuning of a 135M model)"""
    batch_size: int = 8
    """problems (reference answers) per optimizer step, split across processes"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up, in optimizer steps"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""

    RULES: ClassVar[dict[str, str]] = {"lr": "> 0", "batch_size": "> 0", "weight_decay": ">= 0",
                                       "warmup_steps": ">= 0", "max_grad_norm": "> 0"}
    PER_PROCESS: ClassVar[tuple[str, ...]] = ("batch_size",)

    def check(self) -> None:
        super().check()
        require(self.task in REFERENCES, "task", self.task,
                f"SFT needs reference answers, which only {', '.join(REFERENCES)} carry")


# ------------------------------------------------------------------------------------ ALGO LOGIC
def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, num_tokens=None):
    """Token-mean cross-entropy of the answer tokens, L(θ) above.

    logits [N, L, V] at every position of input_ids [N, L] (position t predicts token t + 1);
    loss_mask [N, L] is 1 on the answer's tokens (its EOS included) and 0 on prompt tokens and padding.
    num_tokens: the normaliser Σ_i |y_i| of the whole batch, over every process (default: this batch's).
    Returns the loss and {"token_accuracy": share of answer tokens that are the argmax}.
    """
    logits, target, mask = logits[:, :-1].float(), input_ids[:, 1:], loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(mask)
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    loss = (nll * mask).sum() / max(float(num_tokens), 1.0)
    with torch.no_grad():
        hits = (logits.argmax(-1) == target).float()
        token_accuracy = (hits * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"token_accuracy": token_accuracy}


def sft_batch(tokenizer, task, problems) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, loss_mask) [N, L] of prompt + reference answer + EOS, right-padded.

    The prompt is the chat-templated text evaluation uses, tokenized on its own as `generate` tokenizes
    it, and the answer is tokenized separately: the answer tokens are what the model would generate."""
    rows = []
    for p in problems:
        prompt = tokenizer(chat_prompt(tokenizer, p.prompt, task.system_prompt), add_special_tokens=False).input_ids
        answer = tokenizer(REFERENCES[task.name](p), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt, answer))
    width = max(len(x) + len(y) for x, y in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x) + len(y)] = torch.tensor(x + y)
        attention[i, :len(x) + len(y)] = 1
        loss_mask[i, len(x):len(x) + len(y)] = 1  # pad may equal EOS (SmolLM2): the mask, not the ids, decides
    return ids, attention, loss_mask


# ------------------------------------------------------------------------------------ main
def main(args: Args) -> dict:
    run = Run("sft", args)  # flags, resume, task, accelerator, run dir (shared/run.py)
    args, accelerator, task = run.args, run.accelerator, run.task
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    lm = run.setup_lm(weight_decay=args.weight_decay, warmup_steps=args.warmup_steps)
    model, tokenizer, optimizer, scheduler = lm.model, lm.tokenizer, lm.optimizer, lm.scheduler
    step, stream = lm.state.get("step", 0), PromptStream(len(task.train), args.seed, lm.state.get("cursor", 0))

    before = run.evaluate(lm, step, args.max_new_tokens) if step == 0 else None
    last_eval, evaluated, saved = before, (step if before else None), step
    cursor = stream.cursor  # the training order after the last completed step
    bar = tqdm(total=args.total_steps, initial=step, desc="sft", disable=not accelerator.is_main_process)
    try:
        while step < args.total_steps and run.budget_left():  # the budget: reference tokens trained on
            t0 = time.time()
            problems = [task.train[i] for i in stream.take(args.batch_size)[rank::world]]
            ids, attention, loss_mask = (t.to(device) for t in sft_batch(tokenizer, task, problems))
            num_tokens = accelerator.reduce(loss_mask.sum(), reduction="sum")  # Σ|y_i| over every process
            model.train()
            with run.atomic():  # Ctrl-C / SIGTERM wait for the end of the update: no half-updated checkpoint
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                loss, stats = sft_loss(logits, ids, loss_mask, num_tokens)
                accelerator.backward(loss * world)  # DDP averages; the normaliser is global
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                count_generated(int(loss_mask.sum()))  # what an RL method would have generated to see them
                step, cursor = step + 1, stream.cursor

                # ---- logging (over every process)
                step_s = time.time() - t0
                metrics = {
                    "train/loss": accelerator.reduce(loss.detach(), reduction="sum").item(),
                    "sft/token_accuracy": (accelerator.reduce(stats["token_accuracy"] * loss_mask.sum(), reduction="sum")
                                           / num_tokens).item(),
                    "train/grad_norm": grad_norm, "train/lr": scheduler.get_last_lr()[0],
                    "sft/target_tokens": num_tokens.item(), "perf/gen_tokens": run.tokens_spent(),
                    "perf/step_s": step_s, "perf/tokens_per_s": num_tokens.item() / step_s}
                run.logger.log(metrics, step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tokens=metrics["perf/gen_tokens"])
            if step % args.eval_every == 0:
                last_eval, evaluated = run.evaluate(lm, step, args.max_new_tokens), step
            if step % args.save_every == 0:
                run.save(lm, step=step, cursor=cursor)
                saved = step
        # --total-steps done or the token budget spent: either way the run ends with its last step's
        # test-split evaluation and checkpoint
        if evaluated != step:
            last_eval = run.evaluate(lm, step, args.max_new_tokens)
        if saved != step:
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

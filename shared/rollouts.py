"""Group rollouts for on-policy RL on a task: a seeded prompt stream, G samples per prompt, verdicts,
and optional re-generation until every process holds enough groups that pass a filter.

Which groups to keep (DAPO's dynamic sampling, NFT's r̂ ∉ {0, 1}) is the algorithm's decision: it
passes `keep`, and decides with `Groups.take` what happens when too few groups were kept. This module
only does the bookkeeping that makes that work across processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shared.logprobs import token_logprobs
from shared.models import chat_prompt
from shared.sampling import Rollout, cat_rollouts, generate


class PromptStream:
    """An endless, seeded, resumable stream of training-problem indices (an epoch-wise permutation).

    The position is a single integer (`cursor`), saved in checkpoints, so a resumed run sees the same
    prompts as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor

    def take(self, k: int) -> list[int]:
        out = []
        for pos in range(self.cursor, self.cursor + k):
            epoch, i = divmod(pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            out.append(int(perm[i]))
        self.cursor += k
        return out


@dataclass
class Groups:
    """Groups of G answers sampled on this process, in generation order, with the verifier's verdicts
    and which groups passed the algorithm's `keep` filter. Rows [g·G, (g+1)·G) belong to group g."""

    rollout: Rollout
    problems: list  # one per group
    correct: torch.Tensor  # [groups·G] float 0/1
    formatted: torch.Tensor  # [groups·G] float 0/1
    kept: torch.Tensor  # [groups] bool: passed `keep` (all True without a filter)
    gen_batches: int  # generation batches this step needed
    dropped_frac: float  # fraction of generated groups that `keep` rejected (this process)
    raw_accuracy: float  # accuracy over every answer generated (before `keep`, this process)

    @property
    def truncated(self) -> torch.Tensor:
        """[groups·G] True where an answer ran out of tokens before its EOS."""
        return self.rollout.truncated

    def take(self, n: int, fill_with_rejected: bool = False) -> Groups:
        """The first n kept groups (in generation order); with `fill_with_rejected`, topped up with the
        first rejected groups when fewer than n were kept. The result keeps generation order."""
        kept = [g for g in range(len(self.problems)) if self.kept[g]]
        rejected = [g for g in range(len(self.problems)) if not self.kept[g]]
        chosen = sorted((kept + (rejected if fill_with_rejected else []))[:n])
        G = len(self.correct) // max(len(self.problems), 1)
        rows = [r for g in chosen for r in range(g * G, (g + 1) * G)]
        index = torch.tensor(rows, dtype=torch.long)
        return Groups(cat_rollouts([self.rollout], [rows]), [self.problems[g] for g in chosen], self.correct[index],
                      self.formatted[index], self.kept[torch.tensor(chosen, dtype=torch.long)], self.gen_batches,
                      self.dropped_frac, self.raw_accuracy)


def sample_groups(accelerator, model, tokenizer, task, stream: PromptStream, *, batch_size: int, group_size: int,
                  max_new_tokens: int, temperature: float, gen_batch_size: int | None = None,
                  keep: Callable[[torch.Tensor], torch.Tensor] | None = None, max_gen_batches: int = 1,
                  grade_truncated: bool = False) -> Groups:
    """Draw `batch_size` prompts per generation batch (split across processes), sample `group_size`
    answers each and verify them. With `keep` (correct [n·G] -> bool [n]), generate further batches,
    at most `max_gen_batches`, until every process holds batch_size/world kept groups. Returns every
    group generated on this process with its `kept` flag; what to do with too few kept groups is the
    caller's decision (`Groups.take`). Every process runs the same number of batches.
    An answer cut off at `max_new_tokens` (no EOS) is wrong unless `grade_truncated`, before `keep`
    sees it: half an answer is not an answer, even when its last number happens to match."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank, G = batch_size // world, group_size
    rollouts, problems, correct, formatted, kept = [], [], [], [], []
    for _ in range(max_gen_batches if keep is not None else 1):
        batch = [task.train[i] for i in stream.take(batch_size)[rank::world]]
        prompts = [chat_prompt(tokenizer, p.prompt, task.system_prompt) for p in batch]
        ro = generate(model, tokenizer, prompts, n=G, max_new_tokens=max_new_tokens,
                      temperature=temperature, batch_size=gen_batch_size)
        verdicts = [task.verify(text, batch[j // G]) for j, text in enumerate(ro.texts)]
        c = torch.tensor([v.correct for v in verdicts], dtype=torch.float32)
        if not grade_truncated:
            c = c * (~ro.truncated.cpu()).float()
        rollouts.append(ro)
        problems += batch
        correct.append(c)
        formatted.append(torch.tensor([v.format_ok for v in verdicts], dtype=torch.float32))
        kept.append(keep(c) if keep is not None else torch.ones(len(batch), dtype=torch.bool))
        have = torch.tensor(float(torch.cat(kept).sum()), device=accelerator.device)
        fewest = -accelerator.reduce(-have, reduction="max")  # min over processes (accelerate has no "min")
        if fewest >= per_rank:
            break
    kept_all = torch.cat(kept)
    correct_all = torch.cat(correct)
    return Groups(rollout=cat_rollouts(rollouts), problems=problems, correct=correct_all, formatted=torch.cat(formatted),
                  kept=kept_all, gen_batches=len(rollouts), dropped_frac=float((~kept_all).float().mean()),
                  raw_accuracy=float(correct_all.mean()) if len(correct_all) else 0.0)


def shuffled_groups(n_rows: int, group_size: int, device=None) -> torch.Tensor:
    """Rows 0..n_rows-1 in a random order of whole groups: the G rows of a group stay adjacent and in order,
    so mini- and micro-batches cut from it run each prompt once for its group (`shared.logprobs`)."""
    order = torch.randperm(n_rows // group_size)
    return (order[:, None] * group_size + torch.arange(group_size)).flatten().to(device)


def group_micro_batch(micro_batch_size: int, group_size: int) -> int:
    """Rows per forward pass: `micro_batch_size` rounded down to whole groups; below one group it stays as
    it is (a group's answers then share their prompt's pass within each micro-batch)."""
    return micro_batch_size - micro_batch_size % group_size if micro_batch_size >= group_size else micro_batch_size


def rollout_logprobs(model, ro: Rollout, rows: torch.Tensor, temperature: float, micro_batch_size: int,
                     grad: bool = False) -> torch.Tensor:
    """Log-probs of the answer tokens of `ro[rows]`, `micro_batch_size` rows per forward pass.
    Detached unless `grad` (π_old and π_ref are computed this way, once per rollout)."""
    out = []
    with torch.set_grad_enabled(grad):
        for chunk in rows.split(micro_batch_size):
            out.append(token_logprobs(model, ro.prompt_ids[chunk], ro.prompt_mask[chunk], ro.completion_ids[chunk],
                                      ro.completion_mask[chunk], temperature=temperature))
    return torch.cat(out)

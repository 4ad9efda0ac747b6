"""Group rollouts for on-policy RL on a task: a seeded prompt stream, G samples per prompt, verdicts,
and optional re-generation until every process holds enough groups that pass a filter.

Which groups to keep (DAPO's dynamic sampling, NFT's r̂ ∉ {0, 1}) is the algorithm's decision: it
passes `keep`. This module only does the bookkeeping that makes that work across processes.
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
    """B/world groups of G answers on this process, with the verifier's verdicts."""

    rollout: Rollout
    problems: list  # one per group
    correct: torch.Tensor  # [n] float 0/1
    formatted: torch.Tensor  # [n] float 0/1
    gen_batches: int  # generation batches this step needed
    dropped_frac: float  # fraction of generated groups that `keep` rejected (all batches, this process)
    raw_accuracy: float  # accuracy over every answer generated this step (before `keep`), this process


def sample_groups(accelerator, model, tokenizer, task, stream: PromptStream, *, batch_size: int, group_size: int,
                  max_new_tokens: int, temperature: float, gen_batch_size: int | None = None,
                  keep: Callable[[torch.Tensor], torch.Tensor] | None = None, max_gen_batches: int = 1) -> Groups:
    """Draw `batch_size` prompts per generation batch (split across processes), sample `group_size`
    answers each and verify them. With `keep` (correct [n·G] -> bool [n]), generate further batches —
    at most `max_gen_batches` — until every process holds batch_size/world kept groups; if generation
    runs out, the rejected groups fill the remainder so all processes stay in lockstep.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank, G = batch_size // world, group_size
    batches, dropped, seen, n_correct = [], 0, 0, 0.0
    for _ in range(max_gen_batches if keep is not None else 1):
        problems = [task.train[i] for i in stream.take(batch_size)[rank::world]]
        prompts = [chat_prompt(tokenizer, p.prompt, task.system_prompt) for p in problems]
        ro = generate(model, tokenizer, prompts, n=G, max_new_tokens=max_new_tokens,
                      temperature=temperature, batch_size=gen_batch_size)
        verdicts = [task.verify(text, problems[j // G]) for j, text in enumerate(ro.texts)]
        correct = torch.tensor([v.correct for v in verdicts], dtype=torch.float32)
        formatted = torch.tensor([v.format_ok for v in verdicts], dtype=torch.float32)
        kept = keep(correct) if keep is not None else torch.ones(len(problems), dtype=torch.bool)
        dropped, seen, n_correct = dropped + int((~kept).sum()), seen + len(problems), n_correct + correct.sum().item()
        batches.append((ro, problems, correct, formatted, kept))
        have = torch.tensor(float(sum(int(b[-1].sum()) for b in batches)), device=accelerator.device)
        if accelerator.reduce(have, reduction="min") >= per_rank:  # every process has enough
            break
    # exactly per_rank groups: kept groups first (in generation order), then rejected ones if short
    chosen = [(b, g) for flag in (True, False) for b, batch in enumerate(batches)
              for g in range(len(batch[1])) if bool(batch[-1][g]) == flag][:per_rank]
    chosen.sort()
    rows = [[r for bb, g in chosen if bb == b for r in range(g * G, (g + 1) * G)] for b in range(len(batches))]
    pick = lambda i: torch.cat([b[i][torch.tensor(r, dtype=torch.long)] for b, r in zip(batches, rows)])  # noqa: E731
    return Groups(rollout=cat_rollouts([b[0] for b in batches], rows),
                  problems=[batches[b][1][g] for b, g in chosen], correct=pick(2), formatted=pick(3),
                  gen_batches=len(batches), dropped_frac=dropped / max(seen, 1), raw_accuracy=n_correct / max(seen * G, 1))


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

"""Greedy held-out evaluation, split across processes and summed."""

from __future__ import annotations

import torch

from shared.models import chat_prompt
from shared.sampling import generate, uncounted


@torch.no_grad()
def evaluate(model, tokenizer, task, problems, max_new_tokens: int, batch_size: int = 64,
             accelerator=None) -> dict[str, float]:
    """Greedy accuracy, format rate and mean completion length of `model` on `problems`.

    With an accelerator each process answers `problems[rank::world]` and the counts are summed,
    so the figure is over the whole list whatever the number of processes.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = problems[rank::world]
    correct = formatted = tokens = 0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        prompts = [chat_prompt(tokenizer, p.prompt, task.system_prompt) for p in chunk]
        with uncounted():  # evaluation is not part of a method's training budget
            rollout = generate(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, greedy=True)
        tokens += int(rollout.completion_mask.sum())
        for problem, text in zip(chunk, rollout.texts):
            verdict = task.verify(text, problem)
            correct += verdict.correct
            formatted += verdict.format_ok
    device = accelerator.device if accelerator else "cpu"
    totals = torch.tensor([correct, formatted, tokens, len(mine)], dtype=torch.float64, device=device)
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
    correct, formatted, tokens, n = totals.tolist()
    n = max(n, 1)
    return {"accuracy": correct / n, "format_rate": formatted / n, "completion_len": tokens / n}

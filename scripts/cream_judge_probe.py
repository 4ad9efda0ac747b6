"""How often does the model write a parseable "Score: <n>" as an SRLM judge? (issue 17, the SRLM baseline)

For each model given (default: the base model and the SFT model M_1 of the benchmark), sample N answers to
`n_problems` training prompts, judge every answer once with algos/cream.py's JUDGE_PROMPT at the sampling
temperature, and report the parse rate, the score distribution and a few verdicts. Writes
docs/cream/judge_probe.md.

  flock /tmp/cpu.lock python scripts/cream_judge_probe.py --models HuggingFaceTB/SmolLM2-135M-Instruct \\
      runs/cream_benchmark/sft/<run>/checkpoint
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import collections
import time
from dataclasses import dataclass

import torch
import tyro

from algos.cream import JUDGE_PROMPT, parse_judge_score
from shared.models import chat_prompt, load_model
from shared.sampling import generate
from shared.tasks import load_task

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Args:
    models: tuple[str, ...] = ("HuggingFaceTB/SmolLM2-135M-Instruct",)
    """models to probe (names or save_pretrained directories)"""
    task: str = "multistep"
    """task of the prompts"""
    level: int = 3
    """its level"""
    n_problems: int = 8
    """training prompts (the benchmark's first iteration block starts after its 128 seed problems)"""
    group_size: int = 5
    """N answers per prompt"""
    max_new_tokens: int = 48
    """answer budget"""
    judge_max_new_tokens: tuple[int, ...] = (128, 256)
    """verdict budgets to try"""
    temperature: float = 0.8
    """sampling temperature of answers and verdicts"""
    top_p: float = 0.95
    """nucleus sampling"""
    seed: int = 0
    """seed"""
    out: str = "docs/cream/judge_probe.md"
    """where the report is written"""


def main(a: Args) -> None:
    task = load_task(a.task, seed=a.seed, n_train=128 + a.n_problems, n_test=1, level=a.level)
    problems = task.train[128:]
    lines = [f"# SRLM judge probe: `{a.task}` level {a.level}, {len(problems)} prompts × {a.group_size} answers, "
             f"T = {a.temperature}, top-p {a.top_p}, one verdict per answer", "",
             "| model | verdict budget | parsed | scores (count) | answers correct | mean verdict length | time |",
             "|---|---|---|---|---|---|---|"]
    examples = []
    for name in a.models:
        model, tok = load_model(name, device="cpu", seed=a.seed)
        torch.manual_seed(a.seed)
        ro = generate(model, tok, [chat_prompt(tok, p.prompt, task.system_prompt) for p in problems], n=a.group_size,
                      max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p)
        correct = [task.verify(t, problems[i // a.group_size]).correct for i, t in enumerate(ro.texts)]
        prompts = [chat_prompt(tok, JUDGE_PROMPT.format(question=problems[i // a.group_size].prompt, response=t))
                   for i, t in enumerate(ro.texts)]
        for budget in a.judge_max_new_tokens:
            t0 = time.time()
            v = generate(model, tok, prompts, n=1, max_new_tokens=budget, temperature=a.temperature, top_p=a.top_p,
                         batch_size=40)
            scores = [parse_judge_score(text) for text in v.texts]
            parsed = [s for s in scores if s is not None]
            lengths = v.completion_mask.sum(1).float().mean().item()
            lines.append(f"| `{name.split('/')[-1] if '/' in name and not name.startswith(('runs', '/')) else name}` | "
                         f"{budget} | {len(parsed)}/{len(scores)} | {dict(sorted(collections.Counter(parsed).items()))} | "
                         f"{sum(correct)}/{len(correct)} | {lengths:.0f} tokens | {time.time() - t0:.0f} s |")
            if budget == max(a.judge_max_new_tokens):
                examples += [(name, ro.texts[i], v.texts[i], scores[i]) for i in (0, 1, 7)]
    lines += ["", "## Verdicts (the longest budget)", ""]
    for name, answer, verdict, score in examples:
        lines += [f"**{name}** — answer `{answer.strip()[:120]!r}` → parsed score {score}", "",
                  "```", verdict.strip()[:1200], "```", ""]
    (ROOT / a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))

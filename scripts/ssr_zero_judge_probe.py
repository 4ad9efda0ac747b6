"""What does the model write as SSR-Zero's 0–100 judge? Greedy judging of two correct EN→DE translations
with algos/ssr_zero.py's judge prompt (chat template, pre-filled <think>), each output printed with its
parsed score. README's SSR-Zero section quotes it for SmolLM2-135M-Instruct:

    python scripts/ssr_zero_judge_probe.py [--model M] [--max-new-tokens 128]
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import argparse

from algos.ssr_zero import Args, judge_prompt, parse_score, sample
from shared.models import load_model

ITEMS = [("The cat sleeps on the warm chair.", "Die Katze schläft auf dem warmen Stuhl.", "en", "de"),
         ("I like green apples.", "Ich mag grüne Äpfel.", "en", "de")]

if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--model", default=Args.model)
    cli.add_argument("--max-new-tokens", type=int, default=128)
    flags = cli.parse_args()
    args = Args(model=flags.model, chat_template=True, prefill_think=True, stop_at_answer=True)
    model, tokenizer = load_model(args.model)
    prompts = [judge_prompt(tokenizer, *item, args) for item in ITEMS]
    for (x, y, _, _), text in zip(ITEMS, sample(model, tokenizer, prompts, 1, flags.max_new_tokens, 0.0, args).texts):
        score, found = parse_score(text, "<think>")
        print(f"{x!r} -> {y!r}\n  judge wrote: {text[:300]!r}\n  parsed score: {score if found else 'none'}")

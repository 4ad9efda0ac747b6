"""SSR-Zero on the built-in EN↔DE sentences with SmolLM2-135M-Instruct (issue 19, "measured, not claimed").

Runs `algos/ssr_zero.py`'s main() once and writes docs/ssr_zero/benchmark.md (test and dev chrF,
the lenient chrF, format rate and the model's own judge score, before and after), benchmark.json and
benchmark.png (per-step reward, format rate, self-score, judge parse failures). The defaults fit about
15 minutes on 2 CPU cores; pass larger sizes on a GPU.

  python scripts/ssr_zero_benchmark.py                 # the CPU run reported in docs/ssr_zero/benchmark.md
  python scripts/ssr_zero_benchmark.py --from-json     # rewrite the table and plot from benchmark.json
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import platform
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from algos import ssr_zero  # noqa: E402
from shared.run import read_metrics  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy (= judge) model"""
    seed: int = 0
    """seed of the prompt order and the sampling"""
    total_steps: int = 8
    """GRPO steps"""
    batch_size: int = 2
    """B: sources per step"""
    group_size: int = 8
    """G: candidates per source"""
    max_new_tokens: int = 64
    """actor budget"""
    judge_max_new_tokens: int = 32
    """judge budget"""
    lr: float = 1e-5
    """AdamW learning rate"""
    chat_template: bool = True
    """use the instruct model's chat template (SmolLM2 is an instruct model, not a base model)"""
    prefill_think: bool = True
    """pre-fill <think> (helps a 135M model produce the format at all)"""
    stop_at_answer: bool = True
    """stop generations at the first </answer>"""
    out: str = "docs/ssr_zero"
    """where the table, JSON and plot go"""
    runs_dir: str = "runs"
    """where the run directory goes"""
    from_json: bool = False
    """only rewrite the table and plot from benchmark.json"""


def run(args: Args) -> dict:
    torch.set_num_threads(2)
    algo = ssr_zero.Args(
        model=args.model, seed=args.seed, total_steps=args.total_steps, batch_size=args.batch_size,
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, judge_max_new_tokens=args.judge_max_new_tokens,
        lr=args.lr, chat_template=args.chat_template, prefill_think=args.prefill_think,
        stop_at_answer=args.stop_at_answer, eval_every=args.total_steps, save_every=args.total_steps,
        output_dir=args.runs_dir)
    t0 = time.time()
    out = ssr_zero.main(algo)
    wall = time.time() - t0
    rows = read_metrics(pathlib.Path(out["run_dir"]))
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
             if k not in ("out", "runs_dir", "from_json") and v != getattr(Args(), k)]
    return {"command": " ".join(["python scripts/ssr_zero_benchmark.py", *flags]), "wall_s": wall,
            "hardware": f"{platform.machine()} CPU x{torch.get_num_threads()}, torch {torch.__version__}",
            "args": vars(args), "algo_args": {k: v for k, v in vars(algo).items()},
            "before": out["before"], "after": out["after"], "metrics": rows}


def write(result: dict, out: pathlib.Path) -> None:
    b, a = result["before"], result["after"]
    lines = [f"# SSR-Zero benchmark (one seed)\n", f"Command: `{result['command']}`  ",
             f"Wall time: {result['wall_s'] / 60:.1f} min on {result['hardware']}.\n",
             "| split | metric | before | after |", "|---|---|---|---|"]
    for split, name in (("eval", "test"), ("dev", "dev")):
        for key in ("chrf", "chrf_en-de", "chrf_de-en", "chrf_lenient", "format_rate", "self_score",
                    "judge_parse_fail", "lang_ratio", "quote_frac"):
            fmt = (lambda d: f"{d[split][key]:.2f}" if key in d.get(split, {}) else "–")
            lines.append(f"| {name} | {key} | {fmt(b)} | {fmt(a)} |")
    train = [r for r in result["metrics"] if "train/reward" in r]
    lines += ["", "| step | reward | format rate | self-score | judge parse fail | zero-std groups | s/step |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['train/reward']:.2f} | {r['train/format_rate']:.2f} | {r.get('ssr_zero/self_score', float('nan')):.1f} | "
              f"{r.get('ssr_zero/judge_parse_fail', float('nan')):.2f} | {r['ssr_zero/zero_std_frac']:.2f} | {r['perf/step_s']:.0f} |" for r in train]
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [r["step"] for r in train]
    for ax, key, title in zip(axes, ("train/reward", "train/format_rate", "ssr_zero/self_score"),
                              ("reward", "format-valid rate", "mean self-score (judged)")):
        ax.plot(steps, [r.get(key, float("nan")) for r in train], marker="o")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "benchmark.png", dpi=120)


def main(args: Args) -> None:
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        result = json.loads((out / "benchmark.json").read_text())
    else:
        result = run(args)
        (out / "benchmark.json").write_text(json.dumps(result, indent=1, default=str))
    write(result, out)
    print((out / "benchmark.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))

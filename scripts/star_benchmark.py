"""STaR vs B-STaR on `arith` with SmolLM2-135M-Instruct, a few iterations each (issue 4).

Runs `algos/star.py`'s main() once per mode on the same task split and dev set, then writes
docs/star/benchmark.md (dev accuracy per iteration, Pass@K, the chosen temperature, ...),
docs/star/benchmark.json and docs/star/benchmark.png. The defaults fit ~20 minutes on 2 shared CPU
cores; pass larger sizes on a GPU.

  python scripts/star_benchmark.py                      # the CPU run reported in docs/star/benchmark.md
  python scripts/star_benchmark.py --threads 1          # on a machine whose cores other jobs share
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import platform
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from algos import star  # noqa: E402
from shared.run import read_metrics  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Args:
    modes: tuple[str, ...] = ("star", "bstar")
    """modes to run, in order"""
    model: str = "smollm2"
    """policy model"""
    level: int = 1
    """arith level (1 = two-digit addition)"""
    seed: int = 0
    """seed of the split, the sampling and the SFT shuffling"""
    iterations: int = 2
    """outer iterations per mode"""
    n_train: int = 48
    """training questions (M), all answered every iteration"""
    n_test: int = 50
    """dev questions (greedy accuracy after every iteration)"""
    group_size: int = 4
    """K for B-STaR sampling and the Pass@K monitors"""
    pass_s: int = 2
    """S in Pass@K-S / Reward@K-S"""
    subset_size: int = 12
    """B-STaR search / monitor subset"""
    temperatures: tuple[float, ...] = (0.5, 0.8, 1.1)
    """B-STaR temperature grid (paper: 0.5..1.2 step 0.1); the monitor temperature is 0.8"""
    steps: int = 12
    """SFT steps in iteration 1 (STaR grows ×1.2; B-STaR constant)"""
    batch_size: int = 4
    """sequences per SFT step"""
    warmup_steps: int = 0
    """warm-up in both modes (STaR's 100 would leave a 12-step iteration at 12% of the lr)"""
    lr: float = 2e-5
    """Adam learning rate, both modes"""
    max_new_tokens: int = 32
    """generation budget (rationale + answer)"""
    threads: int = 2
    """torch CPU threads"""
    output_dir: str = "runs/star_benchmark"
    """where the runs land"""
    docs_dir: str = "docs/star"
    """where the table, JSON and plot are written"""
    from_json: bool = False
    """only rewrite the table and plot from `{docs_dir}/benchmark.json` (no training)"""


def main(a: Args) -> None:
    if a.from_json:
        saved = json.loads((ROOT / a.docs_dir / "benchmark.json").read_text())
        return write_docs(Args(**saved["meta"]["args"]), saved["meta"], saved["results"], ROOT / a.docs_dir)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results, start = {}, time.time()
    for mode in a.modes:
        t0 = time.time()
        out = star.main(star.Args(
            model=a.model, task="arith", level=a.level, seed=a.seed, output_dir=a.output_dir, iterations=a.iterations,
            n_train=a.n_train, n_test=a.n_test, mode=mode, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
            warmup_steps=a.warmup_steps, max_new_tokens=a.max_new_tokens, group_size=a.group_size, pass_s=a.pass_s,
            subset_size=a.subset_size, temperatures=a.temperatures, monitor_temperature=0.8))
        rows = read_metrics(pathlib.Path(out["run_dir"]))
        dev = {int(r["step"]): r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
        its = [r for r in rows if "star/selected" in r]
        results[mode] = {"run_dir": out["run_dir"], "wall_s": time.time() - t0, "dev_accuracy": dev,
                         "iterations": [{k: r[k] for k in r if k.startswith(("star/", "bstar/", "train/", "perf/"))} | {"iteration": int(r["step"])} for r in its]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({a.threads} torch threads, {os.cpu_count()} cores)"
    meta = {"args": a.__dict__, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "total_wall_s": time.time() - start}
    docs = ROOT / a.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    write_docs(a, meta, results, docs)


def write_docs(a: Args, meta: dict, results: dict, docs: pathlib.Path) -> None:
    """benchmark.md (the table) and benchmark.png from the measured results."""
    for res in results.values():  # JSON round trips turn the int keys into strings
        res["dev_accuracy"] = {int(k): v for k, v in res["dev_accuracy"].items()}
    device, K, S = meta["device"], a.group_size, a.pass_s
    lines = [f"# STaR vs B-STaR on arith level {a.level}, {a.model}", "",
             f"Measured with `python scripts/star_benchmark.py{' --threads ' + str(a.threads) if a.threads != 2 else ''}` on {device}; "
             f"total wall time {meta['total_wall_s'] / 60:.1f} min. M = {a.n_train} training questions, dev = {a.n_test} "
             f"held-out questions (greedy), K = {K}, S = {S}, monitors on {a.subset_size} training questions at T = 0.8, "
             f"SFT batch {a.batch_size}, lr {a.lr}, {a.steps} steps in iteration 1, max {a.max_new_tokens} new tokens. "
             "Dev accuracy in row n is after iteration n's update; every other column describes the policy that "
             "sampled iteration n's data (before the update): monitors on a fresh seeded subset each iteration, "
             "train acc = its accuracy on the training questions (STaR: greedy first pass; B-STaR: at the chosen T). "
             "One seed; 50 dev questions, so one standard error is about ±0.07.", "",
             f"| mode | iteration | dev acc | Pass@{K} | Pass@{K}-{S} | Best-of-{K} | Reward@{K}-{S} | diversity | T chosen | BS (search) | train acc | selected | rationalized | SFT steps | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, res in results.items():
        lines.append(f"| {mode} | 0 (base) | {res['dev_accuracy'].get(0, float('nan')):.3f} | | | | | | | | | | | | |")
        for r in res["iterations"]:
            i = r["iteration"]
            lines.append(
                f"| {mode} | {i} | {res['dev_accuracy'].get(i, float('nan')):.3f} | {r.get('star/pass_at_k', float('nan')):.3f} | "
                f"{r.get('star/pass_at_k_s', float('nan')):.3f} | {r.get('star/best_of_k', float('nan')):.3f} | "
                f"{r.get('star/reward_at_k_s', float('nan')):.3f} | {r.get('star/diversity', float('nan')):.3f} | "
                f"{'greedy' if mode == 'star' else r['star/temperature']} | {r.get('bstar/search_balance_score', float('nan')):.3f} | "
                f"{r['train/accuracy']:.3f} | {int(r['star/selected'])} | {int(r['star/rationalized'])} | {int(r['train/steps'])} | "
                f"{r['perf/iter_s']:.0f} |")
    (docs / "benchmark.md").write_text("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, res in results.items():
        xs = sorted(res["dev_accuracy"])
        ax1.plot(xs, [res["dev_accuracy"][x] for x in xs], "o-", label=mode)
        its = res["iterations"]
        ax2.plot([r["iteration"] for r in its], [r.get("star/pass_at_k", float("nan")) for r in its], "o-", label=f"{mode} Pass@{K}")
        ax2.plot([r["iteration"] for r in its], [r.get("star/pass_at_k_s", float("nan")) for r in its], "s--", label=f"{mode} Pass@{K}-{S}")
    ax1.set(xlabel="iteration", ylabel="dev accuracy (greedy)", title=f"arith level {a.level}, {a.model}")
    ax2.set(xlabel="iteration (its sampling policy, before the update)", ylabel="fraction of questions", title=f"monitors (K={K}, T=0.8, {a.subset_size} questions)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs / "benchmark.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))

"""STaR vs B-STaR on `multistep` (step-by-step arithmetic) with SmolLM2-135M-Instruct (issue 11, items 4–6).

Runs `algos/star.py`'s main() once per mode on the same task splits, then writes docs/star/benchmark.md
(per iteration: dev and test accuracy, the monitors, the chosen temperature and threshold with the
balance score's two terms, how many kept rationales have a wrong step), docs/star/benchmark.json
and docs/star/benchmark.png. The B-STaR search grid of every iteration (BS, exploration, exploitation
at each (t, τ)) comes from the run's bstar_search.jsonl. The defaults fit about 20 minutes on 2 CPU
cores; pass larger sizes on a GPU.

  python scripts/star_benchmark.py                      # the CPU run reported in docs/star/benchmark.md
  python scripts/star_benchmark.py --from-json          # rewrite the table and plot from benchmark.json
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
NAN = float("nan")


@dataclass
class Args:
    modes: tuple[str, ...] = ("star", "bstar")
    """modes to run, in order"""
    model: str = "smollm2"
    """policy model"""
    task: str = "multistep"
    """a task whose answers carry reasoning (multistep: built in; gsm8k needs the hub)"""
    level: int = 1
    """multistep level (1 = two ± steps on one-digit numbers)"""
    seed: int = 0
    """seed of the training split, the sampling and the SFT shuffling"""
    iterations: int = 3
    """outer iterations per mode (all run: no early stopping, the best is picked on dev)"""
    n_train: int = 48
    """training questions (M), all answered every iteration"""
    n_dev: int = 50
    """dev questions: greedy accuracy after every iteration picks the best iteration"""
    n_test: int = 100
    """test questions: greedy accuracy reported at every evaluation point, never used to choose"""
    group_size: int = 4
    """K for B-STaR sampling and the Pass@K monitors"""
    pass_s: int = 2
    """S in Pass@K-S / Reward@K-S"""
    subset_size: int = 16
    """B-STaR search / monitor subset"""
    temperatures: tuple[float, ...] = (0.5, 0.8, 1.1)
    """B-STaR temperature grid (paper: 0.5..1.2 step 0.1); the monitors use 0.8"""
    steps: int = 12
    """SFT steps in iteration 1 (STaR grows ×1.2; B-STaR constant)"""
    batch_size: int = 4
    """sequences per SFT step"""
    warmup_steps: int = 0
    """warm-up in both modes (STaR's 100 would leave a 12-step iteration at 12% of the lr)"""
    lr: float = 2e-5
    """Adam learning rate, both modes"""
    max_new_tokens: int = 64
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
        return write_docs(Args(**{**saved["meta"]["args"], "from_json": True}), saved["meta"], saved["results"], ROOT / a.docs_dir)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results, start = {}, time.time()
    for mode in a.modes:
        t0 = time.time()
        out = star.main(star.Args(
            model=a.model, task=a.task, level=a.level, seed=a.seed, output_dir=a.output_dir, iterations=a.iterations,
            n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test, mode=mode, steps=a.steps, batch_size=a.batch_size,
            lr=a.lr, warmup_steps=a.warmup_steps, max_new_tokens=a.max_new_tokens, group_size=a.group_size,
            pass_s=a.pass_s, subset_size=a.subset_size, temperatures=a.temperatures, monitor_temperature=0.8))
        run_dir = pathlib.Path(out["run_dir"])
        rows = read_metrics(run_dir)
        search = run_dir / "bstar_search.jsonl"
        results[mode] = {
            "run_dir": str(run_dir), "wall_s": time.time() - t0, "best": out["best"],
            "dev": {int(r["step"]): r["dev/accuracy"] for r in rows if "dev/accuracy" in r},
            "test": {int(r["step"]): r["eval/accuracy"] for r in rows if "eval/accuracy" in r},
            "iterations": [{k: r[k] for k in r if k.startswith(("star/", "bstar/", "train/", "perf/"))}
                           | {"iteration": int(r["step"])} for r in rows if "star/selected" in r],
            "search": [json.loads(line) for line in search.read_text().splitlines()] if search.exists() else []}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({a.threads} torch threads, {os.cpu_count()} cores)"
    meta = {"args": a.__dict__, "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "total_wall_s": time.time() - start}
    docs = ROOT / a.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    write_docs(a, meta, results, docs)


def command(a: Args) -> str:
    """The command line that reproduces `a` (the flags that differ from the defaults)."""
    flags = []
    for k, v in a.__dict__.items():
        v = tuple(v) if isinstance(v, list) else v  # JSON turns tuples into lists
        if k != "from_json" and v != getattr(Args(), k):
            flags.append(f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, tuple) else str(v)))
    return " ".join(["python scripts/star_benchmark.py", *flags])


def f3(x) -> str:
    return "" if x is None or x != x else f"{x:.3f}"


def write_docs(a: Args, meta: dict, results: dict, docs: pathlib.Path) -> None:
    """benchmark.md (the tables) and benchmark.png from the measured results."""
    for res in results.values():  # JSON round trips turn the int keys into strings
        res["dev"], res["test"] = ({int(k): v for k, v in res[s].items()} for s in ("dev", "test"))
    K, S = a.group_size, a.pass_s
    lines = [f"# STaR vs B-STaR on {a.task} level {a.level}, {a.model}", "",
             f"Measured with `{command(a)}` on {meta['device']}, torch {meta['torch']}; total wall "
             f"time {meta['total_wall_s'] / 60:.1f} min. M = {a.n_train} training questions; dev = {a.n_dev} and test = "
             f"{a.n_test} held-out questions (greedy; dev picks the best iteration, test is only reported); K = {K}, "
             f"S = {S}; monitors on {a.subset_size} training questions at T = 0.8; SFT batch {a.batch_size}, lr {a.lr}, "
             f"{a.steps} steps in iteration 1 (STaR ×1.2 per iteration, from the base weights; B-STaR constant, "
             f"continuing); max {a.max_new_tokens} new tokens; B-STaR grid T = {list(a.temperatures)}, τ ∈ −1..1 "
             "step 0.1, n* = 6, r = 1[right answer] + r_prm from the exact step checker.", "",
             "Dev and test accuracy in row n are after iteration n's update; every other column describes the policy "
             "that sampled iteration n's data (before the update). train acc: STaR's greedy first pass, B-STaR's "
             "samples at the chosen T. wrong-step: share of the kept answers (rat.: of the rationalized ones) whose "
             "steps contain a wrong or invented calculation. explore / exploit: the balance score's two terms at the "
             f"chosen (T, τ). One seed; {a.n_test} test questions, so one standard error is about "
             f"±{(0.25 / a.n_test) ** 0.5:.2f} at 50 %.", "",
             f"| mode | iteration | dev acc | test acc | Pass@{K} | Pass@{K}-{S} | Best-of-{K} | Reward@{K}-{S} | T | τ | BS | "
             "explore | exploit | train acc | selected | rationalized | wrong-step (rat.) | SFT steps | wall s |",
             "|" + "---|" * 19]
    for mode, res in results.items():
        lines.append(f"| {mode} | 0 (base) | {f3(res['dev'].get(0))} | {f3(res['test'].get(0))} |" + " |" * 15)
        for r in res["iterations"]:
            i, g = r["iteration"], r.get
            lines.append(
                f"| {mode} | {i} | {f3(res['dev'].get(i))} | {f3(res['test'].get(i))} | {f3(g('star/pass_at_k'))} | "
                f"{f3(g('star/pass_at_k_s'))} | {f3(g('star/best_of_k'))} | {f3(g('star/reward_at_k_s'))} | "
                f"{'greedy' if mode == 'star' else r['star/temperature']} | {'' if mode == 'star' else r['star/threshold']} | "
                f"{f3(g('bstar/search_balance_score'))} | {f3(g('bstar/exploration'))} | {f3(g('bstar/exploitation'))} | "
                f"{f3(r['train/accuracy'])} | {int(r['star/selected'])} | {int(r['star/rationalized'])} | "
                f"{f3(g('star/kept_wrong_step'))}{' (' + f3(g('star/rationalized_wrong_step')) + ')' if mode == 'star' else ''} | "
                f"{int(r['train/steps'])} | {r['perf/iter_s']:.0f} |")
    lines += ["", "Best iteration by dev accuracy, and its test accuracy (the number to report):", "",
              "| mode | best iteration | dev acc | test acc | test acc of the base model | wall min |", "|---|---|---|---|---|---|"]
    for mode, res in results.items():
        b = res["best"]
        lines.append(f"| {mode} | {b['iteration']} | {f3(b['dev_accuracy'])} | {f3(b['test_accuracy'])} | "
                     f"{f3(res['test'].get(0))} | {res['wall_s'] / 60:.1f} |")
    for entry in results.get("bstar", {}).get("search", []):
        taus = sorted({float(tau) for row in entry["grid"].values() for tau in row})
        shown = sorted({tau for tau in taus if round(tau * 10) % 5 == 0} | {float(entry["tau"])})
        lines += ["", f"B-STaR search, iteration {entry['iteration']}: BS (exploration · exploitation) at each (T, τ) on the "
                  f"{a.subset_size}-question subset; chosen T = {entry['t']}, τ = {entry['tau']}", "",
                  "| T | " + " | ".join(f"τ = {tau:g}" for tau in shown) + " | best τ at this T |", "|" + "---|" * (len(shown) + 2)]
        for t, row in entry["grid"].items():
            vals = {float(k): v for k, v in row.items()}
            best_tau = max(taus, key=lambda tau: (vals[tau][0], -tau))
            cells = [f"{vals[tau][0]:.3f} ({vals[tau][1]:.2f} · {f3(vals[tau][2]) or '–'})" for tau in shown]
            lines.append(f"| {t} | " + " | ".join(cells) + f" | {best_tau:g} |")
    (docs / "benchmark.md").write_text("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, res in results.items():
        for split, style in (("dev", "o-"), ("test", "s--")):
            xs = sorted(res[split])
            ax1.plot(xs, [res[split][x] for x in xs], style, label=f"{mode} {split}")
        its = res["iterations"]
        ax2.plot([r["iteration"] for r in its], [r.get("star/pass_at_k", NAN) for r in its], "o-", label=f"{mode} Pass@{K}")
        ax2.plot([r["iteration"] for r in its], [r.get("star/kept_wrong_step", NAN) for r in its], "s--", label=f"{mode} kept with a wrong step")
    ax1.set(xlabel="iteration", ylabel="greedy accuracy", title=f"{a.task} level {a.level}, {a.model}")
    ax2.set(xlabel="iteration (its sampling policy, before the update)", ylabel="fraction", title=f"monitors (K={K}, T=0.8)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs / "benchmark.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))

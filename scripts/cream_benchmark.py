"""CREAM vs its C = 1 ablation vs the SRLM judge baseline, same seed and iterations (issue 17).

Runs the seed SFT stage once (`algos/cream.py --iterations 0`: M_0 → M_1), copies that run once per
method and resumes each copy for T iterations with the method's flags, each in its own process, so all
three start from the same M_1 and sample the same prompt blocks with the same seeds. Then writes
docs/cream/benchmark.md (held-out greedy accuracy of every M_t and the mean consistency of every
iteration), docs/cream/benchmark.json, docs/cream/benchmark.png and each run's metrics. The defaults
fit about 20 minutes of the 2-core CPU with SmolLM2-135M-Instruct; pass larger sizes on a GPU.

  flock /tmp/cpu.lock python scripts/cream_benchmark.py       # the CPU run in docs/cream/benchmark.md
  python scripts/cream_benchmark.py --model tiny ...            # a quick check of the script itself
  python scripts/cream_benchmark.py --from-json                # redraw the table and plot only
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from shared.run import read_metrics  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = {  # name → (flags, label)
    "cream": (["--consistency", "avg"], "CREAM (C̄, Kendall τ)"),
    "c1": (["--consistency", "off"], "C = 1 (plain DPO, same kind of pairs)"),
    "srlm": (["--judge", "--consistency", "off"], "SRLM (LLM-as-judge, C = 1)"),
}


@dataclass
class Args:
    methods: tuple[str, ...] = ("cream", "c1", "srlm")
    """methods to run, in order: cream, c1 (--consistency off), srlm (--judge)"""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy model"""
    task: str = "multistep"
    """a built-in task with a verifier"""
    level: int = 3
    """its level (multistep 3: two of + − × on 2..12; SFT on level 1 already reaches 90 %)"""
    seed: int = 0
    """one seed for every method (split, sampling, shuffling)"""
    iterations: int = 3
    """CREAM iterations T (M_2 .. M_{T+1})"""
    n_seed: int = 128
    """seed SFT examples"""
    sft_epochs: int = 3
    """seed SFT epochs"""
    prompts_per_iteration: int = 16
    """prompts per iteration (disjoint across iterations)"""
    n_test: int = 100
    """held-out problems (greedy accuracy of every M_t)"""
    extra: str = "--batch-size 4 --micro-batch-size 4 --judge-samples 1"
    """further flags for every run (given to the SFT run, so the resumed runs inherit them)"""
    output_dir: str = "runs/cream_benchmark"
    """where the runs land"""
    docs_dir: str = "docs/cream"
    """where the table, JSON, plot and metrics are written"""
    from_json: bool = False
    """only redraw the table and plot from `{docs_dir}/benchmark.json`"""


def main(a: Args) -> None:
    docs = ROOT / a.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    if a.from_json:
        saved = json.loads((docs / "benchmark.json").read_text())
        write_docs(saved["meta"], saved["results"], docs)
        return
    common = ["--model", a.model, "--task", a.task, "--level", str(a.level), "--seed", str(a.seed),
              "--n-seed", str(a.n_seed), "--sft-epochs", str(a.sft_epochs),
              "--prompts-per-iteration", str(a.prompts_per_iteration), "--n-test", str(a.n_test), *a.extra.split()]
    t_all = time.time()
    sft_out = ROOT / a.output_dir / "sft"
    sft_out.mkdir(parents=True, exist_ok=True)
    sft_run, sft_s = launch([*common, "--iterations", "0"], sft_out)
    results = {}
    for name in a.methods:
        run_dir = ROOT / a.output_dir / name / sft_run.name
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(sft_run, run_dir)
        _, wall = launch(["--resume", str(run_dir), "--iterations", str(a.iterations), *METHODS[name][0]], None)
        results[name] = collect(read_metrics(run_dir), a.iterations) | {"wall_s": wall}
        shutil.copy(run_dir / "metrics.jsonl", docs / f"{name}_metrics.jsonl")
    commands = {"sft": " ".join([*common, "--iterations", "0"]),
                **{name: f"--resume <copy of the SFT run> --iterations {a.iterations} " + " ".join(METHODS[name][0])
                   for name in a.methods}}
    meta = {"args": asdict(a), "total_wall_s": time.time() - t_all, "sft_wall_s": sft_s, "commands": commands,
            "torch": torch.__version__,
            "hardware": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}
    (docs / "benchmark.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    write_docs(meta, results, docs)


def launch(flags: list[str], out: pathlib.Path | None) -> tuple[pathlib.Path | None, float]:
    """Run algos/cream.py with `flags` (in `out`, a new run directory, when given); (that directory, wall seconds)."""
    before = set(out.iterdir()) if out else set()
    cmd = [sys.executable, str(ROOT / "algos" / "cream.py"), *flags] + (["--output-dir", str(out)] if out else [])
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return (next(iter(set(out.iterdir()) - before)) if out else None), time.time() - t0


def collect(rows: list[dict], iterations: int) -> dict:
    """Held-out accuracy of M_0 .. M_{T+1} and, per iteration t (logged at step t + 1), its pairs and consistency."""
    acc = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    its = {r["step"] - 1: r for r in rows if "cream/pairs" in r}
    keys = ("cream/consistency", "cream/consistency_all", "cream/pairs", "cream/chosen_correct",
            "cream/rejected_correct", "train/accuracy", "train/scored_frac", "train/loss", "train/margin",
            "perf/step_s", "perf/gen_s", "perf/reward_s", "perf/update_s")
    return {"accuracy": [acc.get(k) for k in range(iterations + 2)],
            "iterations": {t: {k: its[t].get(k) for k in keys} for t in sorted(its)},
            "sft_s": next((r["perf/step_s"] for r in rows if r["step"] == 1 and "perf/step_s" in r), None)}


def fmt(x, pct=False):
    return "–" if x is None or x != x else (f"{100 * x:.0f} %" if pct else f"{x:.3f}")


def write_docs(meta: dict, results: dict, docs: pathlib.Path) -> None:
    a = meta["args"]
    T = a["iterations"]
    lines = [f"# CREAM vs C = 1 vs SRLM on `{a['task']}` level {a['level']}", "",
             f"`{a['model']}`, seed {a['seed']} (one seed), {a['n_seed']} seed SFT examples × {a['sft_epochs']} epochs, "
             f"{T} iterations × {a['prompts_per_iteration']} prompts × N = 5 answers, {a['n_test']} held-out problems "
             f"(greedy). Hardware: {meta['hardware']}. Total wall time {meta['total_wall_s'] / 60:.1f} min, of which "
             f"the shared seed SFT run (M_0 → M_1, both evaluated) {meta['sft_wall_s'] / 60:.1f} min. Extra flags: "
             f"`{a['extra']}`.", "",
             "## Held-out greedy accuracy of every model", "",
             "| method | " + " | ".join(["M_0 (base)", "M_1 (SFT)"] + [f"M_{t + 1} (it. {t})" for t in range(1, T + 1)])
             + " | wall time (iterations) |", "|---" * (T + 4) + "|"]
    for name, r in results.items():
        lines.append(f"| {label(name)} | " + " | ".join(fmt(x, True) for x in r["accuracy"]) + f" | {r['wall_s'] / 60:.1f} min |")
    lines += ["", "## Per iteration", "",
              "C̄: mean Kendall consistency (τ + 1)/2 of the implicit rewards r_t and r_{t−1} over the prompts that "
              "gave a pair (the C every CREAM pair is trained with; measured but unused by C = 1 and SRLM); C all: "
              "the same over every prompt with ≥ 2 ranked answers; chosen / rejected correct: how often y+ and y− are "
              "right by the task's verifier; βΔ: mean over the pairs when their batch was trained.", "",
              "| method | iteration | C̄ | C all | pairs | chosen correct | rejected correct | sampled correct | answers ranked "
              "| train loss | βΔ | time (gen / reward / update) |", "|---" * 12 + "|"]
    for name, r in results.items():
        for t, m in r["iterations"].items():
            lines.append(
                f"| {label(name)} | {t} | {fmt(m['cream/consistency'])} | {fmt(m['cream/consistency_all'])} | "
                f"{int(m['cream/pairs'] or 0)} | "
                f"{fmt(m['cream/chosen_correct'], True)} | {fmt(m['cream/rejected_correct'], True)} | "
                f"{fmt(m['train/accuracy'], True)} | {fmt(m['train/scored_frac'], True)} | "
                f"{fmt(m['train/loss'] if m['cream/pairs'] else None)} | {fmt(m['train/margin'] if m['cream/pairs'] else None)} | "
                f"{m['perf/step_s']:.0f} s ({m['perf/gen_s']:.0f} / {m['perf/reward_s']:.0f} / "
                f"{m['perf/update_s']:.0f}) |")
    untrained = [label(n) for n, r in results.items() if not any(m["cream/pairs"] for m in r["iterations"].values())]
    if untrained:
        lines += ["", f"{', '.join(untrained)}: no pair in any iteration, so the model never changed; from iteration 2 "
                  "on r_t = log π_{M_t} − log π_{M_{t−1}} ≡ 0 and its C values compare index orders (not plotted)."]
    lines += ["", "Commands (each run's metrics: `docs/cream/<method>_metrics.jsonl`):", ""]
    lines += [f"    python algos/cream.py {c}" for c in meta["commands"].values()]
    (docs / "benchmark.md").write_text("\n".join(lines) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        ax1.plot(range(len(r["accuracy"])), [100 * (x if x is not None else float("nan")) for x in r["accuracy"]],
                 marker="o", label=label(name))
        its = sorted(r["iterations"].items(), key=lambda kv: int(kv[0]))
        if not any(m["cream/pairs"] for _, m in its):
            continue  # never trained: M_t = M_{t−1}, r_t ≡ 0, and its "ranking" is the answers' index order
        ax2.plot([int(t) for t, _ in its], [m["cream/consistency_all"] for _, m in its], marker="o", label=label(name))
    ax1.set(xlabel="model M_t (0 base, 1 SFT, t ≥ 2 after iteration t − 1)", ylabel="held-out greedy accuracy (%)",
            xticks=range(T + 2))
    ax2.set(xlabel="iteration t", ylabel="mean Kendall consistency of r_t vs r_{t−1}", xticks=range(1, T + 1))
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{a['task']} level {a['level']}, {a['model'].split('/')[-1]}, seed {a['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(docs / "benchmark.png", dpi=120)
    print((docs / "benchmark.md").read_text())


def label(name: str) -> str:
    return METHODS[name][1] if name in METHODS else name


if __name__ == "__main__":
    main(tyro.cli(Args))

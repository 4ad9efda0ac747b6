"""MCTS-DPO vs plain outcome-level DPO on the step-by-step problems, same rounds, questions and optimiser.

    flock /tmp/cpu.lock python scripts/mcts_dpo_benchmark.py            # CPU budget (≤ 15 min on 2 cores)
    python scripts/mcts_dpo_benchmark.py --preset gpu --out docs/mcts_dpo/gpu

Runs `algos/mcts_dpo.py` twice (step-level MCTS-DPO, then `--baseline`: outcome-level DPO on sampled
pairs) with the same flags, reads their metrics.jsonl, and writes to --out:
    results.md    the table: held-out greedy accuracy of the base, after round 1 and round 2, the
                  search cost (policy calls and seconds per question), pairs, and the step analysis
    results.json  every number in the table plus each run's per-round metrics
    accuracy.png  held-out accuracy per round for both methods
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {  # flags shared by both runs
    "cpu": ["--task", "multistep", "--level", "1", "--iterations", "2", "--prompts-per-iteration", "16",
            "--n-test", "100", "--n-dev", "0", "--max-new-tokens", "64", "--temperature", "0.7", "--batch-size", "2",
            "--epochs", "2", "--lr", "3e-5"],
    "gpu": ["--task", "multistep", "--level", "1", "--iterations", "3", "--prompts-per-iteration", "256",
            "--n-test", "500", "--n-dev", "0", "--max-new-tokens", "64", "--temperature", "0.7", "--batch-size", "8",
            "--epochs", "2", "--lr", "3e-5"],
}


def run(flags: list[str], out_dir: Path, label: str) -> tuple[Path, float]:
    """One run of algos/mcts_dpo.py; returns its run directory and wall time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    t = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "algos" / "mcts_dpo.py"), *flags, "--output-dir", str(out_dir)]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    (run_dir,) = set(out_dir.iterdir()) - before
    return run_dir, time.time() - t


def read(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    rounds = [r for r in rows if "train/updates" in r]
    return {"eval": evals, "rounds": rounds, "run_dir": str(run_dir)}


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--out", default=str(ROOT / "docs" / "mcts_dpo"))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "mcts_dpo_benchmark"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for both runs")
    opt = ap.parse_args()
    flags = PRESETS[opt.preset] + ["--seed", str(opt.seed)] + opt.extra
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)

    results = {"preset": opt.preset, "flags": flags, "seed": opt.seed, "methods": {}}
    for label, extra in (("MCTS-DPO (step-level, cDPO)", []), ("outcome DPO (sampled pairs)", ["--baseline"])):
        run_dir, wall = run(flags + extra, Path(opt.runs_dir), label)
        results["methods"][label] = read(run_dir) | {"wall_s": wall}
        (out / "results.json").write_text(json.dumps(results, indent=2))  # after each run: a crash keeps the first

    lines = [f"MCTS-DPO vs outcome-level DPO, `multistep` level 1, SmolLM2-135M-Instruct, seed {opt.seed} (one seed), "
             f"preset `{opt.preset}`: `{' '.join(flags)}`.", "",
             "Held-out greedy accuracy (test split) after each round; search cost per question; pairs per round.", "",
             "| method | base | round 1 | round 2 | pairs / round | trees kept / round | policy calls / question "
             "| search s / question | chosen steps right | rejected steps right | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in results["methods"].items():
        ev, rounds = m["eval"], m["rounds"]
        acc = [ev.get(i) for i in range(len(rounds) + 1)]
        steps = sum(r["mcts_dpo/analysed_steps"] for r in rounds)
        chosen = mean(rounds, "mcts_dpo/chosen_step_ok") if steps else float("nan")
        rejected = mean(rounds, "mcts_dpo/rejected_step_ok") if steps else float("nan")
        cells = [f"{a:.3f}" if a is not None else "–" for a in acc[:3]] + [""] * (3 - len(acc[:3]))
        lines.append(f"| {label} | {' | '.join(cells)} | {mean(rounds, 'mcts_dpo/pairs'):.1f} | "
                     f"{mean(rounds, 'mcts_dpo/kept_trees'):.1f} | {mean(rounds, 'mcts_dpo/policy_calls'):.1f} | "
                     f"{mean(rounds, 'mcts_dpo/search_s'):.1f} | {chosen:.2f} | {rejected:.2f} | {m['wall_s'] / 60:.1f} min |")
    lines += ["", "Per round (train accuracy = the committed answer of the tree, or the share of right samples for "
              "the baseline; ends = terminal nodes of the trees, or sampled answers; C = self-evaluation; "
              "margin = mean βh over the pairs trained on):", "",
              "| method | round | train accuracy | tree nodes | right / wrong ends | C at right / wrong ends | pairs "
              "| kept trees | updates | loss | margin | pair accuracy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in results["methods"].items():
        for r in m["rounds"]:
            lines.append(f"| {label} | {r['step']} | {r['train/accuracy']:.3f} | {r['mcts_dpo/tree_nodes']:.1f} | "
                         f"{r['mcts_dpo/right_ends']:.0f} / {r['mcts_dpo/wrong_ends']:.0f} | "
                         f"{r['mcts_dpo/C_right']:.3f} / {r['mcts_dpo/C_wrong']:.3f} | {r['mcts_dpo/pairs']:.0f} | {r['mcts_dpo/kept_trees']:.0f} | {r['train/updates']:.0f} | "
                         f"{r['train/loss']:.4f} | {r['mcts_dpo/margin']:.4f} | {r['mcts_dpo/pair_accuracy']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "accuracy.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, m in results["methods"].items():
        steps = sorted(m["eval"])
        ax.plot(steps, [m["eval"][s] for s in steps], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_xticks(sorted(next(iter(results["methods"].values()))["eval"]))
    ax.set_title(f"multistep level 1, SmolLM2-135M, seed {results['seed']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""SPC on `multistep` with SmolLM2-135M-Instruct: the critic on the built-in step-error benchmark for the
base model, after round 0 (SFT on the teacher file) and after each self-play round, with the game's win
rates and validated-error yield per round (issue 16).

Runs `algos/spc.py`'s main() once, then writes docs/spc/benchmark.md (tables), docs/spc/benchmark.json
(every number, plus the run's metrics) and docs/spc/benchmark.png. The defaults are sized to finish
within 15 minutes on this project's 2-core CPU under the lock; pass larger sizes on a GPU.

  flock /tmp/cpu.lock python scripts/spc_benchmark.py        # the CPU run reported in docs/spc/benchmark.md
  python scripts/spc_benchmark.py --from-json                # only redraw the table and plot
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from algos import spc  # noqa: E402
from shared.run import read_metrics  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """base model of both roles and of the solver"""
    level: int = 1
    """multistep level (1 = two one-digit ± steps)"""
    seed: int = 0
    """seed of the split, the teacher file, the benchmark and the sampling"""
    n_train: int = 500
    """training problems (game positions, teacher file)"""
    n_test: int = 30
    """held-out problems the benchmark is built from"""
    sft_steps: int = 20
    """round-0 SFT steps per role"""
    sft_batch_size: int = 8
    """rows per SFT step"""
    sft_lr: float = 1e-4
    """round-0 learning rate (few steps: a high rate teaches the format)"""
    lr: float = 1e-5
    """RL learning rate"""
    iterations: int = 2
    """self-play rounds after round 0"""
    games: int = 16
    """sneaky attempts per round"""
    validation_rollouts: int = 8
    """N solver completions per step"""
    solver_temperature: float = 0.7
    """temperature of the solver's completions"""
    solver_shots: int = 1
    """worked examples in the solver's prompt"""
    solver_max_new_tokens: int = 24
    """budget of a solver completion"""
    epochs: int = 3
    """passes over each round's rows"""
    max_new_tokens: int = 64
    """critique / sneaky rewrite budget"""
    extra: str = ""
    """further flags for algos/spc.py, e.g. "--opponent initial" """
    threads: int = 2
    """torch CPU threads"""
    output_dir: str = "runs/spc_benchmark"
    """where the run lands"""
    docs_dir: str = "docs/spc"
    """where the table, JSON and plot are written"""
    from_json: bool = False
    """only rewrite the table and plot from `{docs_dir}/benchmark.json`"""


EVAL_KEYS = ["acc_correct_step", "acc_error_step", "accuracy", "harmonic", "f1", "first_error_acc", "no_error_acc",
             "acc_error_planted", "acc_error_own", "valid_rate"]
COUNTS = {"spc/games", "spc/parsed", "spc/validated", "spc/critic_rows", "spc/generator_rows"}
GAME_KEYS = ["spc/games", "spc/parsed", "spc/validated", "spc/validated_yield", "spc/p_orig", "spc/p_sneaky",
             "spc/critic_win_rate", "spc/generator_win_rate", "spc/paired_accuracy", "spc/critic_valid_rate",
             "spc/critic_rows", "spc/generator_rows", "train/loss", "spc/generator/loss", "perf/step_s"]


def collect(run_dir: pathlib.Path, sft_steps: int) -> dict:
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    names = {0: "base model", sft_steps: "round 0 (SFT)"}
    stages = [{"stage": names.get(r["step"], f"round {r['step'] - sft_steps}"), "step": r["step"],
               **{k: r.get(f"eval/{k}") for k in EVAL_KEYS}, "eval_s": r.get("perf/eval_s")} for r in evals]
    games = [{"round": r["step"] - sft_steps, **{k: r.get(k) for k in GAME_KEYS}} for r in rows if "spc/games" in r]
    sft = [r for r in rows if "sft/critic_loss" in r]
    bench = json.loads((run_dir / "benchmark.json").read_text())
    sols = bench["solutions"]
    return {"stages": stages, "games": games, "sft_s": sum(r["perf/step_s"] for r in sft),
            "sft_loss": [(r["sft/critic_loss"], r["sft/generator_loss"]) for r in sft],
            "benchmark": {"solutions": len(sols), "steps": sum(len(s["steps"]) for s in sols),
                          "with_error": sum(s["first_error"] >= 0 for s in sols),
                          "own": sum(s["source"] == "own" for s in sols), "unlocated_own": bench["unlocated_own_errors"]}}


def fmt(x, digits=3):
    return "" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_docs(saved: dict, docs: pathlib.Path) -> None:
    a, res, b = saved["args"], saved["results"], saved["results"]["benchmark"]
    lines = [f"# SPC on multistep level {a['level']}, {a['model'].split('/')[-1]}", "",
             f"Measured with `{saved['command']}` on {saved['hardware']}; total wall time {saved['wall_min']:.1f} min "
             f"(round-0 SFT {res['sft_s'] / 60:.1f} min). One seed ({a['seed']}).", "",
             f"Budget: {a['n_train']} training problems; round 0 = {a['sft_steps']} SFT steps × {a['sft_batch_size']} rows per "
             f"role (lr {a['sft_lr']}) on the programmatic teacher file; {a['iterations']} self-play rounds of {a['games']} sneaky "
             f"attempts, N = {a['validation_rollouts']} solver completions per step (T = {a['solver_temperature']}, "
             f"{a['solver_shots']} worked example(s), {a['solver_max_new_tokens']} tokens), {a['epochs']} epochs over each round's rows "
             f"(+ as many teacher rows, α = 0.15), lr {a['lr']}, {a['max_new_tokens']} new tokens per critique. "
             f"Extra flags: `{a['extra'] or 'none'}`.", "",
             f"Benchmark (built from {a['n_test']} held-out problems, deterministic from the seed): {b['solutions']} solutions, "
             f"{b['steps']} judged steps; {b['with_error']} solutions with a first error, of which {b['own']} are the base "
             f"model's own wrong solutions (first wrong step located by `check_steps`; {b['unlocated_own']} wrong answers "
             f"had no locatable error and are left out). Critiques are greedy. Step accuracies exclude invalid verdicts "
             f"(as SPC's eval script); `valid` is the share of parseable verdicts. F1 is ProcessBench's (harmonic mean of "
             f"exact first-error accuracy on erroneous solutions and no-error accuracy on correct ones; an invalid verdict "
             f"flags nothing).", "",
             "| critic | correct-step acc | error-step acc | average | harmonic | first-error acc | no-error acc | F1 | "
             "error acc (planted) | error acc (own) | valid |", "|---" * 11 + "|"]
    for s in res["stages"]:
        lines.append(f"| {s['stage']} | " + " | ".join(fmt(s[k]) for k in ["acc_correct_step", "acc_error_step", "accuracy",
                     "harmonic", "first_error_acc", "no_error_acc", "f1", "acc_error_planted", "acc_error_own", "valid_rate"]) + " |")
    lines += ["", "The game, per round (the critic that played is the one evaluated in the row above it):", "",
              "| round | attempts | parsed | validated | yield | p_orig | p_sneaky | critic wins | generator wins | "
              "paired acc | critic valid | critic rows | generator rows | wall s |", "|---" * 14 + "|"]
    for g in res["games"]:
        lines.append(f"| {g['round']} | " + " | ".join(fmt(int(g[k])) if k in COUNTS else fmt(g[k], 2)
                     for k in ["spc/games", "spc/parsed", "spc/validated", "spc/validated_yield", "spc/p_orig", "spc/p_sneaky",
                               "spc/critic_win_rate", "spc/generator_win_rate", "spc/paired_accuracy", "spc/critic_valid_rate",
                               "spc/critic_rows", "spc/generator_rows"]) + f" | {g['perf/step_s']:.0f} |")
    lines += ["", "Win rates are over validated sneaky steps with a parseable verdict; `paired acc` is the critic saying "
              "Correct on the original step; rows are after balancing (as many +1 as −1).", "",
              "![accuracy per stage](benchmark.png)", ""]
    (docs / "benchmark.md").write_text("\n".join(lines))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(res["stages"]))
    for k, label in [("acc_correct_step", "correct-step acc"), ("acc_error_step", "error-step acc"),
                     ("accuracy", "average"), ("f1", "ProcessBench F1")]:
        ax1.plot(x, [float("nan") if s[k] is None else s[k] for s in res["stages"]], marker="o", label=label)
    ax1.set_xticks(list(x), [s["stage"] for s in res["stages"]], rotation=15)
    ax1.set_ylim(0, 1.05), ax1.set_title("critic on the step-error benchmark"), ax1.legend()
    rounds = [g["round"] for g in res["games"]]
    for k, label in [("spc/critic_win_rate", "critic wins"), ("spc/generator_win_rate", "generator wins"),
                     ("spc/validated_yield", "validated yield"), ("spc/paired_accuracy", "paired acc")]:
        ax2.plot(rounds, [g[k] for g in res["games"]], marker="o", label=label)
    ax2.set_xticks(rounds), ax2.set_xlabel("round"), ax2.set_ylim(0, 1.05), ax2.set_title("the game"), ax2.legend()
    fig.tight_layout()
    fig.savefig(docs / "benchmark.png", dpi=120)


def main(a: Args) -> None:
    docs = ROOT / a.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    if a.from_json:
        write_docs(json.loads((docs / "benchmark.json").read_text()), docs)
        return
    torch.set_num_threads(a.threads)
    flags = ["--model", a.model, "--level", str(a.level), "--seed", str(a.seed), "--n-train", str(a.n_train),
             "--n-test", str(a.n_test), "--sft-steps", str(a.sft_steps), "--sft-batch-size", str(a.sft_batch_size),
             "--sft-lr", str(a.sft_lr), "--lr", str(a.lr), "--iterations", str(a.iterations), "--games", str(a.games),
             "--validation-rollouts", str(a.validation_rollouts), "--epochs", str(a.epochs),
             "--solver-temperature", str(a.solver_temperature), "--solver-shots", str(a.solver_shots),
             "--solver-max-new-tokens", str(a.solver_max_new_tokens),
             "--max-new-tokens", str(a.max_new_tokens), "--output-dir", a.output_dir, *a.extra.split()]
    command = "python scripts/spc_benchmark.py " + shlex.join(sys.argv[1:])
    sys.argv = ["spc.py", *flags]
    t0 = time.time()
    out = spc.main(spc.cli(spc.Args))
    wall = (time.time() - t0) / 60
    run_dir = pathlib.Path(out["run_dir"])
    saved = {"args": asdict(a), "command": command.strip(),
             "hardware": f"this project's {os.cpu_count()}-core {platform.machine()} CPU, "
                         f"{round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, torch {torch.__version__} "
                         f"({a.threads} torch threads)",
             "wall_min": wall, "run_dir": str(run_dir), "results": collect(run_dir, a.sft_steps),
             "metrics": read_metrics(run_dir)}
    (docs / "benchmark.json").write_text(json.dumps(saved, indent=1, default=str))
    write_docs(saved, docs)
    print((docs / "benchmark.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))

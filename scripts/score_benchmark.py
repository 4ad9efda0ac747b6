"""SCoRe on `multistep` with SmolLM2-135M-Instruct: the base model vs Stage I only vs Stage I + II (issue 14).

All arms share the model, seed, split, prompt stream and number of training steps N:
  base             the model before training (step-0 evaluation)
  Stage I only     N Stage I steps (`--stage2-steps 0`)
  Stage I + II     N/2 Stage I steps, then N/2 Stage II steps
and the table also shows their shared Stage I checkpoint at N/2, where Stage II starts.
The two trained arms are the same run for their first N/2 steps, so that prefix is trained once: the Stage I
run stops at N/2, its directory is copied, and the copy continues with `--resume ... --stage1-steps N/2
--stage2-steps N/2`, which ends in the same state as a Stage I + II run from scratch (resume is bit-identical,
tests/test_score.py). Every evaluation is two-turn greedy on the same held-out problems.

Writes docs/score/benchmark.md (table), benchmark.json (numbers, config, hardware, wall times),
benchmark.png (plot) and each run's metrics as docs/score/*_metrics.jsonl.

  flock /tmp/cpu.lock python scripts/score_benchmark.py            # the CPU run in docs/score/benchmark.md
  python scripts/score_benchmark.py --steps 200 --batch-size 64 --n-test 500 --docs-dir docs/score/gpu   # a GPU
  python scripts/score_benchmark.py --from-json                    # redraw the table and plot only
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
COLUMNS = [("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"), ("delta", "Δ(t1,t2)"), ("delta_i2c", "Δ^{i→c}"),
           ("delta_c2i", "Δ^{c→i}"), ("changed_frac", "answer changed"), ("edit_ratio", "edit ratio")]


@dataclass
class Args:
    steps: int = 6
    """N: training steps of each trained arm (Stage I + II: N/2 each). With --batch-size 12 and four evaluations
    of 100 problems the whole script took 10.3 min on the 2-core CPU (median step 36 s; docs/score/benchmark.md);
    the earlier defaults (16 steps × 16 problems) would take about 25 min"""
    batch_size: int = 12
    """problems per step (one two-turn rollout each)"""
    level: int = 1
    """multistep level (1 = a ± b ± c on one-digit numbers)"""
    n_test: int = 100
    """held-out problems (two-turn greedy; each evaluation of 100 takes about a minute on 2 CPU cores)"""
    max_new_tokens: int = 64
    """tokens per turn"""
    lr: float = 1e-5
    """Adam learning rate"""
    seed: int = 0
    """seed of the split, sampling and prompt stream (one seed)"""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """policy model"""
    extra: str = ""
    """further flags for algos/score.py, e.g. "--baseline --alpha 5" """
    threads: int = 2
    """torch CPU threads (OMP_NUM_THREADS)"""
    output_dir: str = "runs/score_benchmark"
    """where the runs land"""
    docs_dir: str = "docs/score"
    """where the table, JSON, plot and metrics are written"""
    from_json: bool = False
    """only redraw the table and plot from {docs_dir}/benchmark.json"""


def score(args: list[str], a: Args) -> float:
    """Run algos/score.py with `args`; return its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    t = time.time()
    cmd = [sys.executable, str(ROOT / "algos" / "score.py"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.time() - t


def evals(run: pathlib.Path) -> dict[int, dict]:
    """{step: {metric: value}} of a run's test-split evaluations."""
    return {r["step"]: {k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in read_metrics(run) if "eval/acc_t2" in r}


def main(a: Args) -> None:
    docs = ROOT / a.docs_dir
    if a.from_json:
        return write(json.loads((docs / "benchmark.json").read_text()), docs)
    assert a.steps % 2 == 0, "--steps must be even (N/2 steps per stage)"
    half, out = a.steps // 2, ROOT / a.output_dir / f"seed{a.seed}_{int(time.time())}"
    common = ["--model", a.model, "--task", "multistep", "--level", str(a.level), "--seed", str(a.seed),
              "--n-test", str(a.n_test), "--batch-size", str(a.batch_size), "--max-new-tokens", str(a.max_new_tokens),
              "--lr", str(a.lr), "--eval-every", str(half), "--save-every", str(half), *a.extra.split()]
    t0 = time.time()
    wall = {"stage1_first_half": score(common + ["--stage1-steps", str(a.steps), "--stage2-steps", "0",
                                                 "--total-steps", str(half), "--output-dir", str(out / "stage1")], a)}
    stage1 = next((out / "stage1").iterdir())
    both = out / "stage1_2" / stage1.name
    shutil.copytree(stage1, both)  # the shared Stage I prefix: its checkpoint at step N/2
    wall["stage1_second_half"] = score(["--resume", str(stage1), "--total-steps", str(a.steps)], a)
    wall["stage2_second_half"] = score(["--resume", str(both), "--stage1-steps", str(half), "--stage2-steps", str(half),
                                        "--total-steps", str(a.steps)], a)
    wall["total"] = time.time() - t0

    e1, e12 = evals(stage1), evals(both)
    rows = [("base", 0, e1[0]), ("Stage I", half, e1[half]), ("Stage I only", a.steps, e1[a.steps]),
            ("Stage I + II", a.steps, e12[a.steps])]
    docs.mkdir(parents=True, exist_ok=True)
    for name, run in (("stage1", stage1), ("stage1_2", both)):
        shutil.copy(run / "metrics.jsonl", docs / f"{name}_metrics.jsonl")
    train = {name: [r for r in read_metrics(run) if "train/loss" in r] for name, run in (("stage1", stage1), ("stage1_2", both))}
    result = {
        "config": asdict(a), "score_args": json.loads((both / "args.json").read_text()),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "rows": [{"arm": n, "steps": s, **m} for n, s, m in rows], "wall_s": wall,
        "median_step_s": {k: sorted(r["perf/step_s"] for r in v)[len(v) // 2] for k, v in train.items()},
        "train": {k: [{m: r[m] for m in ("step", "score/stage", "score/acc_t1", "train/accuracy", "train/kl",
                                         "score/changed_frac")} for r in v] for k, v in train.items()}}
    (docs / "benchmark.json").write_text(json.dumps(result, indent=2))
    write(result, docs)


def write(result: dict, docs: pathlib.Path) -> None:
    c = result["config"]
    lines = [f"# SCoRe on multistep level {c['level']}: base vs Stage I only vs Stage I + II", "",
             f"{pathlib.Path(c['model']).name}, seed {c['seed']}, {c['steps']} steps × {c['batch_size']} problems per trained arm "
             f"(Stage I + II: {c['steps'] // 2} + {c['steps'] // 2}), {c['max_new_tokens']} tokens per turn, lr {c['lr']}, "
             f"two-turn greedy evaluation on {c['n_test']} held-out problems. Fractions of all problems; "
             "Δ = Δ^{i→c} − Δ^{c→i}. One seed.", "",
             "| arm | steps | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        cells = [f"{100 * r[k]:+.1f}" if k == "delta" else (f"{r[k]:.3f}" if k == "edit_ratio" else f"{100 * r[k]:.1f}")
                 for k, _ in COLUMNS]
        lines.append(f"| {r['arm']} | {r['steps']} | " + " | ".join(cells) + " |")
    w, hw = result["wall_s"], result["hardware"]
    lines += ["", f"Wall time {w['total'] / 60:.1f} min in all on {hw['device']} ({hw['machine']}, {hw['cpus']} CPUs, "
              f"torch {hw['torch']}); median step {result['median_step_s']['stage1']:.1f} s (Stage I run), "
              f"{result['median_step_s']['stage1_2']:.1f} s (Stage I + II run). The two trained arms share their first "
              f"{c['steps'] // 2} steps (see the script). Plot: [benchmark.png](benchmark.png)."]
    (docs / "benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    arms = [r["arm"] + f"\n({r['steps']} steps)" for r in result["rows"]]
    x = range(len(arms))
    for off, key, label in ((-0.2, "acc_t1", "Acc@t1"), (0.2, "acc_t2", "Acc@t2")):
        ax1.bar([i + off for i in x], [100 * r[key] for r in result["rows"]], width=0.4, label=label)
    ax1.set_xticks(list(x), arms, fontsize=8)
    ax1.set_ylabel(f"held-out accuracy, % ({c['n_test']} problems)")
    ax1.legend()
    ax1.set_title("two-turn greedy accuracy")
    for name, style in (("stage1", "-"), ("stage1_2", "--")):
        rows = result["train"][name]
        steps = [r["step"] for r in rows]
        label = "Stage I only" if name == "stage1" else "Stage I + II"
        ax2.plot(steps, [r["score/acc_t1"] for r in rows], style, color="C0", label=f"{label}: r̂(y1)")
        ax2.plot(steps, [r["train/accuracy"] for r in rows], style, color="C1", label=f"{label}: r̂(y2)")
    ax2.axvline(c["steps"] / 2 + 0.5, color="grey", lw=0.8)
    ax2.set_xlabel("step")
    ax2.set_ylabel("training reward (T = 1)")
    ax2.legend(fontsize=7)
    ax2.set_title("training rewards per step")
    fig.tight_layout()
    fig.savefig(docs / "benchmark.png", dpi=120)


if __name__ == "__main__":
    main(tyro.cli(Args))

"""PIT on the built-in `multistep` preference set with SmolLM2-135M-Instruct (issue 18).

One run of algos/pit.py in three phases, each a resumption of the same run directory, so the SFT model and
R_PIT are shared and the rows differ only in the RL rounds M_PIT has been through:

  phase 1  --curriculum            (none)    stage 1 SFT, stage 2 R_PIT, inference with the SFT-only M_PIT
  phase 2  --curriculum data                 + RL round 0 (references y_l from D), inference
  phase 3  --curriculum data policy          + RL round 1 (references sampled from M_P), inference: full PIT

Every inference starts from the same seed, so y^0 ~ M_P is the same answers in all three rows. Writes
docs/pit/results.md (R_PIT's held-out ordering accuracy; accuracy and win/lose of y^1..y^K against y^0 by
the task's exact grade, with and without the stop rule; R_PIT's own verdict), docs/pit/results.json and
docs/pit/results.png.

  python scripts/pit_benchmark.py --lock /tmp/cpu.lock    # each phase under the shared CPU lock
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import platform
import shlex
import subprocess
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = [("SFT only", []), ("+ RL round 0 (data references)", ["data"]),
          ("+ RL round 1 (M_P references): PIT", ["data", "policy"])]


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """base chat model: M_P, and the start of M_PIT and R_PIT"""
    level: int = 1
    """multistep level (1 = two one-digit ± steps)"""
    seed: int = 0
    """seed of the split, the data order and the sampling"""
    n_train: int = 200
    """training triples"""
    n_test: int = 60
    """held-out triples: RM ordering accuracy and the inference prompts"""
    rl_steps: int = 8
    """updates per RL round"""
    rl_lr: float = 1e-5
    """RL learning rate"""
    extra: str = ""
    """further flags for algos/pit.py in one string, e.g. --extra "--beta 0.1" """
    out_dir: str = "runs/pit_bench"
    """where the run directory goes"""
    docs_dir: str = "docs/pit"
    """where the table, JSON and plot go"""
    lock: str | None = None
    """take this file lock (flock) around each phase, e.g. /tmp/cpu.lock"""
    threads: int = 2
    """torch threads (OMP_NUM_THREADS) of the runs"""
    resume: str | None = None
    """a run directory of an earlier call: skip the phases it has finished"""


def run_phase(args: Args, curriculum: list[str], run_dir: pathlib.Path | None) -> pathlib.Path:
    cmd = [sys.executable, str(ROOT / "algos" / "pit.py"), "--curriculum", *curriculum]
    if run_dir is None:
        cmd += ["--model", args.model, "--task", "multistep", "--level", str(args.level), "--seed", str(args.seed),
                "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--rl-steps", str(args.rl_steps),
                "--rl-lr", str(args.rl_lr), "--output-dir", args.out_dir, *shlex.split(args.extra)]
    else:
        cmd += ["--resume", str(run_dir)]
    if args.lock:
        cmd = ["flock", args.lock] + cmd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    before = set(pathlib.Path(args.out_dir).glob("pit__*")) if run_dir is None else set()
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    if run_dir is None:
        (run_dir,) = set(pathlib.Path(args.out_dir).glob("pit__*")) - before
    return run_dir


def table(args: Args, run_dir: pathlib.Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((run_dir / "args.json").read_text())
    rm = {k: {o: next(r[f"rm/{k}/{o}"] for r in rows if f"rm/{k}/{o}" in r) for o in ("wl>ww", "wl>ll", "wl>lw", "ww>lw", "ll>lw")}
          for k in ("heldout_init", "heldout")}
    infer = {label: json.loads((run_dir / f"inference_{len(c)}.json").read_text()) for label, c in PHASES}
    K = saved["improve_iterations"]
    stage_s = {k.split("/", 2)[2]: v for r in rows for k, v in r.items() if k.startswith("perf/stage_s/")}
    out = {"run_dir": str(run_dir), "args": saved, "rm_ordering_accuracy": rm, "inference": infer, "stage_s": stage_s,
           "total_s": sum(stage_s.values()), "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    lines = [f"# PIT on the built-in multistep preference set (level {args.level}), SmolLM2-135M-Instruct", "",
             f"One seed ({args.seed}); {saved['n_train']} training and {saved['n_test']} held-out triples; "
             f"SFT {saved['sft_epochs']} epoch, R_PIT {saved['rm_epochs']} epoch (batch {saved['batch_size']}, lr "
             f"{saved['lr']}); RL {saved['rl_steps']} updates per round × {saved['rl_batch_size']} prompts × G = "
             f"{saved['group_size']}, β = {saved['beta']}, lr {saved['rl_lr']}; inference T = {saved['infer_temperature']}, "
             f"K = {K}, {saved['max_new_tokens']} new tokens. Compute: {out['total_s'] / 60:.1f} min on "
             f"{out['machine']}, torch {out['torch']}. Run: `{run_dir}`.", "",
             "## R_PIT: held-out ordering accuracy (each of Eq. 2's five orderings)", "",
             "| R_PIT | r^{w,l} > r^{w,w} | r^{w,l} > r^{l,l} | r^{w,l} > r^{l,w} | r^{w,w} > r^{l,w} | r^{l,l} > r^{l,w} |",
             "|---|---|---|---|---|---|"]
    for k, name in (("heldout_init", "initial (SFT LM + random head)"), ("heldout", "trained")):
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.0f} %" for v in rm[k].values()) + " |")
    lines += ["", "## Iterative improvement on held-out prompts: y^0 ~ M_P, y^{k+1} ~ M_PIT(·|x, y^k)", "",
              "Accuracy: final answer right (a truncated answer is wrong). Win/lose: y^k graded strictly better/worse "
              "than y^0 (2 = right and every step right, 1 = right answer only, 0 = wrong); Δ = win − lose, the "
              "paper's metric. R_PIT win: R_PIT(x, y^k, y^0) > 0, the trained gap RM's own verdict.", "",
              "| M_PIT | k | accuracy | well-formed | win | lose | Δ | Δ with stop rule | R_PIT win |", "|---|---|---|---|---|---|---|---|---|"]
    for label, _ in PHASES:
        m = infer[label]
        for k in range(K + 1):
            if k == 0:
                lines.append(f"| M_P (y^0) | 0 | {100 * m['infer/accuracy_k0']:.0f} % | {100 * m['infer/wellformed_k0']:.0f} % | | | | | |")
                continue
            lines.append(f"| {label} | {k} | {100 * m[f'infer/accuracy_k{k}']:.0f} % | {100 * m[f'infer/wellformed_k{k}']:.0f} % | "
                         f"{100 * m[f'infer/win_k{k}']:.0f} % | {100 * m[f'infer/lose_k{k}']:.0f} % | "
                         f"{100 * m[f'infer/delta_k{k}']:+.0f} | {100 * m[f'infer/stop_delta_k{k}']:+.0f} | "
                         f"{100 * m[f'infer/rm_win_k{k}']:.0f} % |")
    lines += ["", f"Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in out["stage_s"].items()), ""]
    return out | {"markdown": "\n".join(lines)}


def plot(out: dict, path: pathlib.Path) -> None:
    K = out["args"]["improve_iterations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, _ in PHASES:
        m = out["inference"][label]
        axes[0].plot(range(K + 1), [100 * m[f"infer/accuracy_k{k}"] for k in range(K + 1)], marker="o", label=label)
        axes[1].plot(range(1, K + 1), [100 * m[f"infer/delta_k{k}"] for k in range(1, K + 1)], marker="o", label=label)
    axes[0].set(xlabel="k (y^0 from M_P, y^k after k rewrites)", ylabel="held-out accuracy (%)", xticks=range(K + 1))
    axes[1].set(xlabel="k", ylabel="Δ = win − lose vs y^0 (points)", xticks=range(1, K + 1))
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle("PIT, multistep (built-in preferences), SmolLM2-135M-Instruct, one seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args) -> None:
    run_dir = pathlib.Path(args.resume) if args.resume else None
    t0 = time.time()
    for _, curriculum in PHASES:
        if run_dir is not None and (run_dir / f"inference_{len(curriculum)}.json").exists():
            continue
        run_dir = run_phase(args, curriculum, run_dir)
    out = table(args, run_dir)
    out["wall_s_with_lock_waits"] = time.time() - t0
    docs = ROOT / args.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text(out.pop("markdown"))
    (docs / "results.json").write_text(json.dumps(out, indent=1))
    plot(out, docs / "results.png")
    print((docs / "results.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))

"""PIT on the built-in `multistep` preference set with SmolLM2-135M-Instruct (issue 18).

One run of algos/pit.py in phases, each a resumption of the same run directory, so M_PIT^SFT and R_PIT are
shared and the rows differ only in the RL rounds M_PIT has been through:

  phase 1  --curriculum            (none)    stage 1 SFT, stage 2 R_PIT, inference with the SFT-only M_PIT
  (--round0-row: --curriculum data           + RL round 0 (references y_l from D), inference)
  phase 2  --curriculum data policy          + RL rounds 0 and 1 (round 1: references sampled from M_P): full PIT

Every inference starts from the same seed, so y^0 ~ M_P is the same answers in every row, and a rewrite differs
between rows only where the RL updates changed M_PIT. Writes docs/pit/results.md (R_PIT's held-out ordering
accuracy; accuracy and win/lose of y^1..y^K against y^0 by the task's exact grade, with and without the stop
rule; R_PIT's own verdict), docs/pit/results.json and docs/pit/results.png.

The whole script is meant to hold the shared CPU lock once, with a wall-clock deadline: when it passes, the
running phase gets SIGTERM (algos/pit.py saves a checkpoint; `--resume RUN_DIR` finishes it later) and the
table holds the phases that finished.

  flock /tmp/cpu.lock python scripts/pit_benchmark.py
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import platform
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORDERINGS = ("wl>ww", "wl>ll", "wl>lw", "ww>lw", "ll>lw")


@dataclass
class Args:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """base chat model: M_P, and the start of M_PIT and R_PIT"""
    level: int = 1
    """multistep level (1 = two one-digit ± steps)"""
    seed: int = 0
    """seed of the data order and the sampling"""
    n_train: int = 40
    """training triples (SFT, R_PIT, RL prompts)"""
    n_test: int = 32
    """held-out triples from the test split: R_PIT's ordering accuracy and the inference prompts"""
    batch_size: int = 4
    """triples per SFT and R_PIT update"""
    lr: float = 5e-5
    """learning rate of SFT and R_PIT"""
    rl_steps: int = 2
    """updates per RL round (rl_batch_size 4 prompts × G = 4 answers each)"""
    rl_lr: float = 1e-5
    """RL learning rate"""
    improve_iterations: int = 3
    """K: rewrites y^1..y^K of y^0"""
    round0_row: bool = False
    """also run inference after RL round 0 alone (one more inference, about two minutes more)"""
    extra: str = ""
    """further flags for algos/pit.py in one string, e.g. --extra "--beta 0.1" """
    deadline_min: float = 14.5
    """wall-clock limit of the whole script in minutes (the running phase gets SIGTERM when it passes)"""
    out_dir: str = "runs/pit_bench"
    """where the run directory goes"""
    docs_dir: str = "docs/pit"
    """where the table, JSON and plot go"""
    threads: int = 2
    """torch threads (OMP_NUM_THREADS) of the runs"""
    resume: str | None = None
    """a run directory of an earlier call: skip the phases it has finished"""


def phases(args: Args) -> list[tuple[str, list[str]]]:
    rows = [("SFT only", []), ("+ RL round 0 (data references)", ["data"]), ("+ RL rounds 0, 1: PIT", ["data", "policy"])]
    return rows if args.round0_row else [rows[0], rows[2]]


def command(args: Args) -> str:
    """The exact command: the flags that differ from the defaults."""
    changed = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}") for k, v in vars(args).items()
               if v != Args.__dataclass_fields__[k].default]
    return " ".join(["flock /tmp/cpu.lock python scripts/pit_benchmark.py", *changed])


def run_phase(args: Args, curriculum: list[str], run_dir: pathlib.Path | None, deadline: float) -> tuple[pathlib.Path, bool]:
    """One call of algos/pit.py: (the run directory, whether it finished before the deadline)."""
    cmd = [sys.executable, str(ROOT / "algos" / "pit.py"), "--curriculum", *curriculum]
    if run_dir is None:
        cmd += ["--model", args.model, "--task", "multistep", "--level", str(args.level), "--seed", str(args.seed),
                "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--rl-steps", str(args.rl_steps), "--rl-lr", str(args.rl_lr),
                "--improve-iterations", str(args.improve_iterations), "--output-dir", args.out_dir, *shlex.split(args.extra)]
    else:
        cmd += ["--resume", str(run_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    before = set(pathlib.Path(args.out_dir).glob("pit__*")) if run_dir is None else set()
    print(" ".join(cmd), flush=True)
    proc, finished = subprocess.Popen(cmd, cwd=ROOT, env=env), True
    try:
        proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        print("deadline passed: SIGTERM to the running phase", flush=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        finished = False
    if finished and proc.returncode:
        raise SystemExit(f"algos/pit.py exited with {proc.returncode}")
    if run_dir is None:
        (run_dir,) = set(pathlib.Path(args.out_dir).glob("pit__*")) - before
    return run_dir, finished


def pct(v: float) -> str:
    return f"{100 * v:.0f} %"


def table(args: Args, run_dir: pathlib.Path, wall_s: float, unfinished: list[str]) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((run_dir / "args.json").read_text())
    rm = {k: {o: next(r[f"rm/{k}/{o}"] for r in rows if f"rm/{k}/{o}" in r) for o in ORDERINGS}
          for k in ("heldout_init", "heldout") if any(f"rm/{k}/wl>lw" in r for r in rows)}
    done = [(label, c) for label, c in phases(args) if (run_dir / f"inference_{len(c)}.json").exists()]
    infer = {label: json.loads((run_dir / f"inference_{len(c)}.json").read_text()) for label, c in done}
    rl = [{k: r[k] for k in ("pit/round", "train/reward", "pit/gap", "pit/copy_gap", "train/kl", "train/accuracy",
                             "pit/true_win", "pit/true_lose", "train/truncated_frac") if k in r}
          for r in rows if "train/reward" in r]
    K = saved["improve_iterations"]
    stage_s = {k.split("/", 2)[2]: v for r in rows for k, v in r.items() if k.startswith("perf/stage_s/")}
    out = {"command": command(args), "run_dir": str(run_dir), "args": saved, "rm_ordering_accuracy": rm,
           "inference": infer, "rl_updates": rl, "stage_s": stage_s, "wall_s": wall_s, "unfinished": unfinished,
           "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    lines = [f"# PIT on the built-in multistep preference set (level {args.level}), {args.model}", "",
             f"`{out['command']}`", "",
             f"One seed ({args.seed}). {saved['n_train']} training triples, {saved['n_test']} held-out triples from the "
             f"test split. SFT {saved['sft_epochs']} epoch and R_PIT {saved['rm_epochs']} epoch (batch "
             f"{saved['batch_size']}, lr {saved['lr']}); RL {saved['rl_steps']} updates per round × "
             f"{saved['rl_batch_size']} prompts × G = {saved['group_size']}, β = {saved['beta']}, lr {saved['rl_lr']}; "
             f"inference T = {saved['infer_temperature']}, K = {K}, {saved['max_new_tokens']} new tokens. "
             f"Wall time {wall_s / 60:.1f} min under the CPU lock on {out['machine']}, torch {out['torch']}. "
             f"Run: `{run_dir}`.", ""]
    if unfinished:
        lines += [f"**Not finished within the deadline: {', '.join(unfinished)}.**", ""]
    lines += ["## R_PIT: held-out ordering accuracy (each of Eq. 2's five orderings)", "",
              "| R_PIT | r^{w,l} > r^{w,w} | r^{w,l} > r^{l,l} | r^{w,l} > r^{l,w} | r^{w,w} > r^{l,w} | r^{l,l} > r^{l,w} |",
              "|---|---|---|---|---|---|"]
    for k, name in (("heldout_init", "before training (SFT LM + random head)"), ("heldout", "trained")):
        if k in rm:
            lines.append(f"| {name} | " + " | ".join(pct(v) for v in rm[k].values()) + " |")
    lines += ["", "## Iterative improvement on held-out prompts: y^0 ~ M_P, y^{k+1} ~ M_PIT(·|x, y^k)", "",
              "Accuracy: final answer right (a truncated answer is wrong). Well-formed: right and every step right. "
              "Win/lose: y^k graded strictly better/worse than y^0 (2 = well-formed, 1 = right answer only, 0 = wrong); "
              "Δ = win − lose, the paper's metric; with the stop rule the chain keeps y^k once R_PIT(x, y^{k+1}, y^k) ≤ 0. "
              "R_PIT gap: mean R_PIT(x, y^k, y^0) (k = 0: the copy gap, R_PIT's zero point is not anchored by Eq. 2); "
              "R_PIT win: how often it is > 0.", "",
              "| M_PIT | k | accuracy | well-formed | win | lose | Δ | Δ with stop rule | R_PIT gap | R_PIT win | tokens "
              "| truncated |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, (label, m) in enumerate(infer.items()):  # y^0 is the same answers in every row: shown once
        for k in range(0 if i == 0 else 1, K + 1):
            g = lambda key: m[f"infer/{key}_k{k}"]  # noqa: E731
            cells = [pct(g("accuracy")), pct(g("wellformed")), "", "", "", "", f"{g('rm_gap'):+.2f}", "",
                     f"{g('len'):.0f}", pct(g("truncated"))]
            if k:
                cells[2:8] = [pct(g("win")), pct(g("lose")), f"{100 * g('delta'):+.0f}", f"{100 * g('stop_delta'):+.0f}",
                              f"{g('rm_gap'):+.2f}", pct(g("rm_win"))]
            lines.append(f"| {label if k else 'M_P (y^0)'} | {k} | " + " | ".join(cells) + " |")
    if rl:
        lines += ["", "## RL updates (training prompts)", "",
                  "| round | update | reward (gap − β·KL) | R_PIT(x, y, y_ref) | copy gap R_PIT(x, y_ref, y_ref) | KL | "
                  "accuracy | beats y_ref (grade) | worse than y_ref | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(rl):
            lines.append(f"| {int(r['pit/round'])} | {i + 1} | {r['train/reward']:+.2f} | {r['pit/gap']:+.2f} | "
                         f"{r['pit/copy_gap']:+.2f} | {r['train/kl']:.3f} | {pct(r['train/accuracy'])} | "
                         f"{pct(r['pit/true_win'])} | {pct(r['pit/true_lose'])} | {pct(r['train/truncated_frac'])} |")
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_s.items()), ""]
    return out | {"markdown": "\n".join(lines)}


def plot(out: dict, path: pathlib.Path) -> None:
    K = out["args"]["improve_iterations"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for label, m in out["inference"].items():
        axes[0].plot(range(K + 1), [100 * m[f"infer/accuracy_k{k}"] for k in range(K + 1)], marker="o", label=label)
        axes[1].plot(range(1, K + 1), [100 * m[f"infer/delta_k{k}"] for k in range(1, K + 1)], marker="o", label=label)
    axes[0].set(xlabel="k (y^0 from M_P, y^k after k rewrites)", ylabel="held-out accuracy (%)", xticks=range(K + 1))
    axes[1].set(xlabel="k", ylabel="Δ = win − lose vs y^0 (points)", xticks=range(1, K + 1))
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    rm = out["rm_ordering_accuracy"]
    for i, (k, name) in enumerate((k, n) for k, n in (("heldout_init", "before"), ("heldout", "trained")) if k in rm):
        axes[2].bar([j + 0.38 * i for j in range(len(ORDERINGS))], [100 * rm[k][o] for o in ORDERINGS], 0.38, label=name)
    axes[2].set(xticks=[j + 0.19 for j in range(len(ORDERINGS))], ylabel="held-out ordering accuracy (%)", ylim=(0, 100))
    axes[2].set_xticklabels(ORDERINGS, fontsize=8)
    axes[2].axhline(50, color="grey", lw=0.8)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"PIT, multistep (built-in preferences), {out['args']['model']}, one seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: Args) -> None:
    run_dir = pathlib.Path(args.resume) if args.resume else None
    t0 = time.time()
    deadline, unfinished = t0 + 60 * args.deadline_min, []
    for label, curriculum in phases(args):
        if run_dir is not None and (run_dir / f"inference_{len(curriculum)}.json").exists():
            continue
        if unfinished or time.time() >= deadline:
            unfinished.append(label)
            continue
        run_dir, finished = run_phase(args, curriculum, run_dir, deadline)
        if not finished:
            unfinished.append(label)
    out = table(args, run_dir, time.time() - t0, unfinished)
    docs = ROOT / args.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text(out.pop("markdown"))
    (docs / "results.json").write_text(json.dumps(out, indent=1))
    if out["inference"]:
        plot(out, docs / "results.png")
    print((docs / "results.md").read_text())


if __name__ == "__main__":
    main(tyro.cli(Args))

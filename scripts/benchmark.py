"""Every language-model method on one model, task, seed, held-out set and budget of generated tokens.

    python scripts/benchmark.py --quick                  # 2-core CPU, 98 min measured: -> docs/results.md
    python scripts/benchmark.py --full                   # one GPU: -> docs/results_full.md
    python scripts/benchmark.py --quick --seeds 0 1 2    # mean and t-based 95 % interval over seeds
    python scripts/benchmark.py --quick --methods sft grpo nft        # a subset
    python scripts/benchmark.py --quick --table-only     # rewrite the table from the finished runs

Each method runs as its own script (`algos/<file>.py`) in a subprocess with the same `--model --task
--level --seed --n-train --n-test --n-dev --max-new-tokens` and `--token-budget B`, and with a step or
iteration count far beyond what B allows, so that the budget, not the schedule, ends it. A run stops
before the first step that would start with B or more tokens generated for training (held-out
evaluation is not counted, see shared/sampling.py), then evaluates and checkpoints as after its last
step; the table reports the tokens it actually spent (at most one step over B).

Rows: the base model (evaluated here, no training) and plain supervised fine-tuning on the task's
reference answers (`algos/sft.py`, which counts the answer tokens it trains on against the same
budget) read every other row against doing nothing and against imitation. "after" is the greedy
accuracy of the final answer on the test split (`eval/accuracy`, the same `shared.evaluation` call in
every script) of the model each script ends with; nothing is selected on test. SPC's critic and
SSR-Zero's translator are not solvers of this task: they run on their own benchmarks under the same
budget and seed and get their own table. The RL methods' rows are read from their own benchmarks'
committed results (`docs/spr/`, `docs/hilp/`).

Runs resume: a (method, seed) with `result.json` is done; one with a checkpoint continues from it
(`--resume`); wall time sums every attempt. Ctrl-C or SIGTERM passes the signal to the running
method, which saves a checkpoint first.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dataclasses
import json
import math
import platform
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field



from shared.args import cli
from shared.run import read_metrics
from shared.stats import t_interval

ROOT = pathlib.Path(__file__).resolve().parents[1]
METRIC = "eval/accuracy"  # greedy accuracy of the final answer on task.test, logged by Run.evaluate
FOREVER = "1000000"  # a step / iteration count the budget always ends first


@dataclass(frozen=True)
class Method:
    label: str
    script: str  # algos/<script>.py; "" for the base model (evaluated here)
    flags: tuple[str, ...] = ()
    metric: str = METRIC  # the "after" value: the last record holding this key
    metric_label: str = "greedy test accuracy"
    before_key: str | None = None  # own-table methods: the metric's "before" value in the final record (else: the first record)
    own: tuple[str, str] | None = None  # (metric key, label) of a second final metric of the method, shown beside
    solver: bool = True  # False: its metric is not greedy accuracy on the task (own table)
    note: str = ""


RESAMPLES = "a step's re-generations (dynamic sampling) count, so one step can overshoot the budget further"
STEPS = ("--total-steps", FOREVER, "--save-every", "20")  # step-loop methods: the budget ends them; a checkpoint every 20 steps

METHODS: dict[str, Method] = {
    "base": Method("base model (no training)", ""),
    "sft": Method("SFT on reference answers (baseline)", "sft", STEPS, note="budget = reference-answer tokens trained on"),
    "grpo": Method("GRPO", "grpo", STEPS),
    "dr_grpo": Method("Dr. GRPO", "grpo", ("--variant", "dr_grpo", *STEPS)),
    "dapo": Method("DAPO", "grpo", ("--variant", "dapo", *STEPS), note=RESAMPLES),
    "nft": Method("NFT", "nft", STEPS, note=RESAMPLES),
    "rft": Method("RFT (NFT's positive half)", "nft", ("--rft", *STEPS), note=RESAMPLES),
    "star": Method("STaR", "star", ("--iterations", "3", "--gen-batch-size", "32", "--subset-size", "0"),
                   note="the budget can end an iteration part-way: it trains on what it generated"),
    "bstar": Method("B-STaR", "star", ("--mode", "bstar", "--iterations", "3", "--gen-batch-size", "32", "--temperatures",
                                       "0.7", "1.0", "--subset-size", "10", "--group-size", "4"),
                    note="search cut to T ∈ {0.7, 1.0} on 10 queries, K = 4, to leave budget for training"),
    "score": Method("SCoRe", "score", STEPS, metric="eval/acc_t1", own=("eval/acc_t2", "two-turn Acc@t2"),
                    note="turn 1 is the same greedy single-turn answer"),
    "cream": Method("CREAM", "cream", ("--iterations", "20", "--prompts-per-iteration", "16", "--gen-batch-size", "40"),
                    note="after a seed SFT on 128 reference answers that the budget does not charge"),
    "pit": Method("PIT (improver of M_P's answers)", "pit", ("--rl-steps", FOREVER, "--infer-temperature", "0",
                                                             "--n-train", "64"),
                  metric="infer/accuracy_k3", metric_label="accuracy of M_P's greedy answers after 3 greedy rewrites",
                  before_key="infer/accuracy_k0",
                  solver=False, note="64 training triples (its SFT and reward-model stages, which the budget does not charge, "
                                    "take 30 min on 1000); RL samples charged"),
    "spc": Method("SPC (step critic)", "spc", ("--iterations", FOREVER, "--games", "8", "--sft-steps", "20"), metric="eval/f1",
                  metric_label="error-step F1 on the step-error benchmark", solver=False,
                  note="after 20 round-0 SFT steps per role on its teacher file, which the budget does not charge; "
                       "8 games a round, so about two rounds (the paper: 2)"),
    "ssr_zero": Method("SSR-Zero (translation)", "ssr_zero", STEPS, metric="eval/chrf",
                       metric_label="test chrF (its own EN/DE/FR task)", solver=False),
    "mcts_dpo": Method("MCTS-DPO", "mcts_dpo", ("--iterations", FOREVER, "--prompts-per-iteration", "4")),
}


@dataclass
class Preset:
    model: str
    task: str
    level: int
    n_train: int
    n_test: int
    n_dev: int
    max_new_tokens: int
    token_budget: int
    eval_every: int  # steps between evaluations of step-loop methods (points on the accuracy-vs-tokens plot)
    hardware: str
    doc: str  # the markdown file under docs/


PRESETS = {
    "quick": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", "multistep", 1, 1000, 50, 50, 64, 4000, 1000000,
                    "this project's 2-core x86_64 CPU, 24 GiB, torch 2.13.0+cpu", "results.md"),
    "full": Preset("HuggingFaceTB/SmolLM2-135M-Instruct", "multistep", 2, 2000, 200, 100, 96, 200000, 10,
                   "one GPU", "results_full.md"),
}


# ------------------------------------------------------------------------------------ running
def common_flags(p: Preset, seed: int, out: pathlib.Path) -> list[str]:
    return ["--model", p.model, "--task", p.task, "--level", str(p.level), "--seed", str(seed), "--n-train",
            str(p.n_train), "--n-test", str(p.n_test), "--n-dev", str(p.n_dev), "--max-new-tokens",
            str(p.max_new_tokens), "--token-budget", str(p.token_budget), "--output-dir", str(out)]


def run_dirs(out: pathlib.Path) -> list[pathlib.Path]:
    """The method's run directories under `out`, oldest first (names end with a creation time)."""
    return sorted((d for d in out.glob("*__*") if (d / "args.json").is_file()), key=lambda d: d.stat().st_mtime)


def command(name: str, p: Preset, seed: int, out: pathlib.Path, resume: bool = True) -> list[str]:
    """The command line that trains (or, with a checkpoint under `out` and `resume`, resumes) `name` for `seed`."""
    m = METHODS[name]
    flags = list(m.flags)
    if "--total-steps" in flags and p.eval_every:
        flags += ["--eval-every", str(p.eval_every)]
    cmd = [sys.executable, f"algos/{m.script}.py", *common_flags(p, seed, out), *flags]
    if m.script == "ssr_zero":  # its own translation task and test set: drop the task's flags
        cmd = [c for i, c in enumerate(cmd) if not _task_flag(cmd, i)]
    done = [d for d in run_dirs(out) if (d / "checkpoint" / "trainer_state.pt").is_file()]
    return cmd + (["--resume", str(done[-1])] if done and resume else [])


def _task_flag(cmd: list[str], i: int) -> bool:
    drop = {"--task", "--level", "--n-train", "--n-test", "--n-dev"}
    return cmd[i] in drop or (i > 0 and cmd[i - 1] in drop)


def run_method(name: str, p: Preset, seed: int, root: pathlib.Path) -> dict:
    """Train `name` for `seed` unless done; returns its result.json record."""
    out = root / f"{name}__s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / "result.json").is_file():
        print(f"done already: {out}", flush=True)
        return json.loads((out / "result.json").read_text())
    if name == "base":
        t0 = time.time()
        res = evaluate_base(p)
        rec = {"method": name, "seed": seed, "after": res["accuracy"], "tokens": 0, "wall_s": time.time() - t0,
               "peak_gb": res["peak_gb"], "command": f"python scripts/benchmark.py --{'full' if p.doc == 'results_full.md' else 'quick'} --methods base"}
        (out / "result.json").write_text(json.dumps(rec, indent=1) + "\n")
        return rec
    cmd = command(name, p, seed, out)
    print(f"\n[{name} seed {seed}] {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, below): let the method save its checkpoint first
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        _log_attempt(out, cmd, time.time() - t0, "interrupted")
        raise
    _log_attempt(out, cmd, time.time() - t0, rc)
    if rc != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {rc}); rerun the same command to resume it")
    rec = {"method": name, "seed": seed, **read_result(run_dirs(out)[-1], METHODS[name]),
           "wall_s": sum(a["wall_s"] for a in _attempts(out)),
           "command": shlex.join(["python", *command(name, p, seed, out, resume=False)[1:]]).replace(f"{ROOT}/", "")}
    (out / "result.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _log_attempt(out: pathlib.Path, cmd: list[str], wall: float, rc) -> None:
    with open(out / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"cmd": cmd, "wall_s": wall, "returncode": rc, "end": time.strftime("%F %T")}) + "\n")


def _attempts(out: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (out / "attempts.jsonl").read_text().splitlines()]


def read_result(run: pathlib.Path, m: Method) -> dict:
    """Final accuracy, tokens spent, the accuracy-vs-tokens curve and peak memory from a run's metrics."""
    rows = read_metrics(run)
    key = m.metric
    evals = [r for r in rows if key in r]
    if not evals:
        raise SystemExit(f"{run}: no {key} record")
    tokens = max((r["perf/gen_tokens"] for r in rows if "perf/gen_tokens" in r), default=float("nan"))
    peaks = [r[k] for r in rows for k in ("perf/cuda_peak_gb", "perf/peak_rss_gb") if k in r]
    before = evals[-1][m.before_key] if m.before_key else evals[0][key]
    return {"after": evals[-1][key], "before": before, "tokens": tokens, "own": evals[-1].get(m.own[0]) if m.own else None,
            "curve": [(r["perf/gen_tokens"], r[key]) for r in evals if "perf/gen_tokens" in r],
            "peak_gb": max(peaks, default=float("nan")), "run": str(run)}


def evaluate_base(p: Preset) -> dict:
    """Greedy test accuracy of the untrained model (the same `evaluate` call as every script's)."""
    import resource

    import torch

    from shared.evaluation import evaluate
    from shared.models import load_model
    from shared.tasks import load_task

    model, tok = load_model(p.model, device="cuda" if torch.cuda.is_available() else "cpu")
    task = load_task(p.task, seed=0, n_train=1, n_test=p.n_test, level=p.level)
    res = evaluate(model, tok, task, task.test, p.max_new_tokens)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(f"base model: greedy test accuracy {res['accuracy']:.3f} on {p.n_test} problems", flush=True)
    return {**res, "peak_gb": peak}


# ------------------------------------------------------------------------------------ the table
def summarise(records: list[dict]) -> dict:
    """Per method: mean over seeds (and 95 % t-interval) of the final accuracy, tokens, wall time, memory."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in records):
        rs = sorted((r for r in records if r["method"] == name), key=lambda r: r["seed"])
        acc, hw = t_interval([r["after"] for r in rs])
        own = [r["own"] for r in rs if r.get("own") is not None]
        before = [r["before"] for r in rs if r.get("before") is not None]
        out[name] = {"seeds": [r["seed"] for r in rs], "per_seed": [r["after"] for r in rs], "mean": acc, "ci": hw,
                     "before": sum(before) / len(before) if before else None,
                     "tokens": sum(r["tokens"] for r in rs) / len(rs), "wall_s": sum(r["wall_s"] for r in rs) / len(rs),
                     "peak_gb": max(r["peak_gb"] for r in rs), "own": sum(own) / len(own) if own else None,
                     "command": rs[0]["command"]}
    return out


def pct(mean: float, hw: float = float("nan")) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(hw) else f" ± {100 * hw:.1f}")


def markdown(summary: dict, p: Preset, preset: str, seeds: list[int], rl: list[str], invocation: str) -> str:
    base = summary.get("base")
    n = len(seeds)
    lines = [f"# Results: every method on one budget ({preset} preset)", "",
             f"{model_name(p.model)}, `{p.task}` level {p.level}, greedy accuracy of the final answer on the same "
             f"{p.n_test} held-out test problems, {p.max_new_tokens} new tokens per answer, a budget of "
             f"**{p.token_budget:,} generated training tokens** per method (held-out evaluation not counted), "
             f"seed{'s' if n > 1 else ''} {', '.join(map(str, seeds))}. Hardware: {p.hardware}. Command: `{invocation}`.", "",
             ("**One seed:** no interval; with "
              f"{p.n_test} test problems one standard error is about ±{100 * math.sqrt(0.25 / p.n_test):.0f} points at 50 %."
              if n == 1 else f"Mean over {n} seeds ± the t-based 95 % interval of the mean."), "",
             "| method | test accuracy after (%) | Δ vs base | tokens spent | wall time (min) | peak memory (GB) | notes | command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        m = METHODS[name]
        if not m.solver:
            continue
        delta = "—" if base is None or name == "base" else f"{100 * (s['mean'] - base['mean']):+.1f}"
        notes = "; ".join(x for x in (m.note, f"{m.own[1]} {pct(s['own'])} %" if m.own and s["own"] is not None else "") if x)
        lines.append(f"| {m.label} | {pct(s['mean'], s['ci'])} | {delta} | {s['tokens']:,.0f} | {s['wall_s'] / 60:.1f} | "
                     f"{s['peak_gb']:.1f} | {notes} | `{s['command']}` |")
    own = [(name, s) for name, s in summary.items() if not METHODS[name].solver]
    if own:
        lines += ["", "Methods that do not solve the task themselves, on their own benchmarks under the same budget and seed:",
                  "", "| method | its metric | before | after | tokens spent | wall time (min) | peak memory (GB) | notes | command |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, s in own:
            m = METHODS[name]
            value = f"{s['mean']:.3f}" + ("" if math.isnan(s["ci"]) else f" ± {s['ci']:.3f}")
            before = "—" if s["before"] is None else f"{s['before']:.3f}"
            lines.append(f"| {m.label} | {m.metric_label} | {before} | {value} | "
                         f"{s['tokens']:,.0f} | {s['wall_s'] / 60:.1f} | {s['peak_gb']:.1f} | {m.note} | `{s['command']}` |")
    missing = [METHODS[k].label for k in METHODS if k not in summary]
    if missing:
        lines += ["", f"Not in this table (not run, or not finished): {', '.join(missing)}. The same command resumes "
                      "the benchmark and adds them."]
    lines += ["", "Tokens spent: the count at the final evaluation (a run stops before the first step that would start "
              "at or over the budget, so it may end up to one step past it). Wall time: the whole script (model "
              "loading, evaluations before and after, checkpoints). Peak memory: the script's peak resident set "
              "(CUDA: peak allocated GPU memory).", ""]
    return "\n".join(lines + rl) + "\n"


def model_name(model: str) -> str:
    return pathlib.Path(model).name


def rl_rows() -> list[str]:
    """The RL methods' rows, from their own benchmarks' committed results."""
    lines = ["## Reinforcement-learning methods (their own benchmarks)", "",
             "| method | benchmark | budget | result | against | source |", "|---|---|---|---|---|---|"]
    spr = sorted((ROOT / "docs" / "spr").glob("benchmark_*.json"))
    for path in spr:
        d = json.loads(path.read_text())
        runs = d["runs"]
        for game in sorted({k.split("|")[0] for k in runs}):
            def mean(algo):
                v = [r["return"] for k, r in runs.items() if k.startswith(f"{game}|{algo}|")]
                return f"{sum(v) / len(v):.1f} ({len(v)} seed{'s' if len(v) > 1 else ''})" if v else "—"
            lines.append(f"| SPR | Atari {game}, final return | {d['steps']:,} agent steps | {mean('spr')} | "
                         f"DER + aug. {mean('der_aug')}, DER {mean('der')} | [{path.stem}.md](spr/{path.stem}.md) |")
    hilp = ROOT / "docs" / "hilp" / "results.json"
    if hilp.is_file():
        d = json.loads(hilp.read_text())
        for r in d["results"]:
            s, budget = r["success"], f"{d['args']['total_steps']:,} gradient steps, {r['dataset']}"
            lines.append(f"| HILP | {r['env']} goal reaching, success (seed {r['seed']}) | {budget} | {100 * s['HILP']:.1f} % "
                         f"(+ planning {100 * s['HILP + plan']:.1f} %) | GCBC {100 * s['GCBC']:.1f} %, random "
                         f"{100 * s['random']:.1f} % | [results.md](hilp/results.md) |")
            q = r.get("prompting", {})
            if "HILP / diff, ridge" in q:
                lines.append(f"| HILP | {r['env']} zero-shot reward prompting, success (seed {r['seed']}) | {budget} | "
                             f"ridge {100 * q['HILP / diff, ridge']:.1f} %, least squares (paper) "
                             f"{100 * q['HILP / diff, LS']:.1f} % | random {100 * q['random']:.1f} % | "
                             f"[results.md](hilp/results.md) |")
    return lines + [""]


def plot(records: list[dict], path: pathlib.Path, p: Preset, base: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = [n for n in dict.fromkeys(r["method"] for r in records) if METHODS[n].solver and n != "base"]
    colours = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        for j, r in enumerate(x for x in records if x["method"] == name):
            pts = [tuple(c) for c in r["curve"]]  # every evaluation of the run (CREAM's seed SFT: a point at 0 tokens)
            pts = pts if pts and pts[0][0] == 0 or base is None else [(0, base)] + pts
            ax.plot(*zip(*pts), "o-", color=colours(i), alpha=0.9 if j == 0 else 0.4, ms=4,
                    label=METHODS[name].label if j == 0 else None)
    if base is not None:
        ax.axhline(base, color="k", ls=":", lw=1, label="base model")
    ax.axvline(p.token_budget, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("tokens generated for training")
    ax.set_ylabel(f"greedy test accuracy ({p.n_test} problems)")
    ax.set_title(f"{model_name(p.model)}, {p.task} level {p.level}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(records: list[dict], p: Preset, preset: str, seeds: list[int], docs: pathlib.Path,
               invocation: str) -> pathlib.Path:
    summary = summarise(records)
    base = summary.get("base", {}).get("mean")
    png = docs / "results" / f"{preset}_accuracy_vs_tokens.png"
    plot(records, png, p, base)
    md = markdown(summary, p, preset, seeds, rl_rows(), invocation)
    md += f"\n![accuracy against generated tokens](results/{png.name})\n"
    (docs / p.doc).write_text(md)
    (docs / "results" / f"{preset}.json").write_text(json.dumps({"preset": dataclasses.asdict(p), "seeds": seeds,
                                                                  "summary": summary, "runs": records}, indent=1) + "\n")
    return docs / p.doc


# ------------------------------------------------------------------------------------ CLI
@dataclass
class Args:
    quick: bool = False
    """the 2-core CPU preset (the default): every method, one seed; 98 minutes on this project's 2-core CPU (the aim was 30)"""
    full: bool = False
    """the one-GPU preset: a larger budget, level, test set and an evaluation every 10 steps"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """seeds; every method runs each (same seed: same train split order and initial sampling state)"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run, in order (default: all; `base` is the untrained model)"""
    model: str | None = None
    """override the preset's model (e.g. `tiny` for a smoke run)"""
    token_budget: int | None = None
    """override the preset's budget of generated training tokens per method"""
    n_test: int | None = None
    """override the preset's number of test problems"""
    max_new_tokens: int | None = None
    """override the preset's tokens per answer"""
    out_dir: str = "runs/benchmark"
    """runs go to {out_dir}/{preset}/{method}__s{seed}/"""
    docs_dir: str = "docs"
    """where the table (results.md / results_full.md) and docs/results/ (plot, json) go"""
    table_only: bool = False
    """only rewrite the table from the finished runs"""


def main(args: Args) -> None:
    from shared.args import require

    require(not (args.quick and args.full), "full", True, "choose one of --quick and --full")
    unknown = [m for m in args.methods if m not in METHODS]
    require(not unknown, "methods", unknown, f"must be among {', '.join(METHODS)}")
    require(bool(args.seeds) and min(args.seeds) >= 0, "seeds", args.seeds, "need one or more seeds >= 0")
    require(args.token_budget is None or args.token_budget > 0, "token_budget", args.token_budget, "must be > 0")
    preset = "full" if args.full else "quick"
    p = dataclasses.replace(PRESETS[preset], **{k: v for k, v in (("model", args.model), ("token_budget", args.token_budget),
                                                                  ("n_test", args.n_test), ("max_new_tokens", args.max_new_tokens))
                                                 if v is not None})
    if args.model == "tiny" or args.model is not None and args.model != PRESETS[preset].model:
        p = dataclasses.replace(p, hardware=f"{p.hardware}; model overridden: {args.model}")
    if preset == "full":
        import torch

        p = dataclasses.replace(p, hardware=torch.cuda.get_device_name() if torch.cuda.is_available() else
                                f"{platform.machine()} CPU (the full preset is meant for a GPU)")
    root = pathlib.Path(args.out_dir).resolve() / preset  # the methods run in the repository root
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    records = []
    for seed in args.seeds:
        for name in args.methods:
            done = root / f"{name}__s{seed}" / "result.json"
            if args.table_only:  # the run's metrics read again; wall time and command as recorded
                rec = json.loads(done.read_text()) if done.is_file() else None
                if rec is not None and name != "base":
                    rec.update(read_result(ROOT / rec["run"], METHODS[name]))  # a relative path is from the root
                records += [rec] if rec is not None else []
            else:
                records.append(run_method(name, p, seed, root))
    if not records:
        raise SystemExit(f"no finished runs under {root}")
    invocation = shlex.join(["python", "scripts/benchmark.py", *(a for a in sys.argv[1:] if a != "--table-only")])
    path = write_docs(records, p, preset, args.seeds, pathlib.Path(args.docs_dir), invocation)
    print(f"\nwrote {path}", flush=True)


if __name__ == "__main__":
    main(cli(Args))

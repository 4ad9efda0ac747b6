"""SPR measurements: update timing and the SPR vs --no-spr comparison run.

  python scripts/spr_benchmark.py timing                    # steps/s, env / update / SPR split, eager vs compile
  python scripts/spr_benchmark.py compare --steps 20000     # SPR and DER (--no-spr) side by side, then `plot`
  (in the background: nohup python scripts/spr_benchmark.py compare --steps 20000 > runs/spr_compare.log 2>&1 &)
  python scripts/spr_benchmark.py plot                      # learning curves + table into docs/spr/

`timing` fills a replay with real random-policy Atari steps, then times `algos.spr.update` (the exact
training update) with and without the SPR loss, eager and torch.compile'd, and projects the wall time of
a run. `compare` is resumable: run the same command again and unfinished runs continue from their
checkpoints.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import copy
import json
import os
import platform
import shlex
import subprocess
import time

import numpy as np
import torch
import tyro

from algos.spr import Args, PrioritizedReplay, SPRNetwork, compute_losses, update
from shared.atari import RANDOM_SCORES, game_name, human_normalized_score, make_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "spr"
# 100k-step scores: SPR from the paper (spec §7); DER as tabulated in mila-iqia/spr src/rlpyt_utils.py
LABELS = {"spr": "SPR", "der": "DER (--no-spr)"}
PAPER_100K = {"Boxing": (35.8, 0.2), "Breakout": (17.1, 1.9), "Kangaroo": (3276.4, 779.3), "Pong": (-5.9, -19.3),
              "MsPacman": (1313.2, 1204.1), "Seaquest": (583.1, 354.1), "Alien": (801.5, 739.9)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def time_updates(args: Args, replay, n_actions: int, device, updates: int, warmup: int) -> tuple[float, float]:
    """Mean seconds per `update` after `warmup` untimed ones (which include any compilation)."""
    torch.manual_seed(0)
    net = SPRNetwork(n_actions, args).to(device)
    q_target, spr_target = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, eps=args.adam_eps)
    loss_fn = torch.compile(compute_losses) if args.compile else compute_losses
    t0 = time.perf_counter()
    for i in range(warmup):
        update(net, q_target, spr_target, opt, replay, args, 0.4, loss_fn, i)
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(updates):
        update(net, q_target, spr_target, opt, replay, args, 0.4, loss_fn, warmup + i)
    return (time.perf_counter() - t0) / updates, t_warm


def timing(env_id: str = "BoxingNoFrameskip-v4", updates: int = 20, warmup: int = 3, fill: int = 600,
           compile: bool = True, threads: int = 0, out: str = ""):
    """Time the pieces of a training step and project the wall time of 20k and 100k steps.

    Args:
        env_id: game to fill the replay with.
        updates: timed updates per variant.
        warmup: untimed first updates (compilation happens there).
        fill: random-policy steps put into the replay (also timed as the env cost).
        compile: also time --compile.
        threads: torch threads (0: torch's default).
        out: markdown file to write the table to.
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = Args(env_id=env_id)
    env = make_env(env_id, seed=0)
    n_actions = env.action_space.n
    replay = PrioritizedReplay(fill, max(base.jumps, base.n_step), base.per_alpha, seed=0)
    obs, _ = env.reset(seed=0)
    net = SPRNetwork(n_actions, base).to(device)
    t_env = t_act = 0.0
    for step in range(fill):
        t0 = time.perf_counter()
        with torch.no_grad():  # acting forward, as after warm-up
            net.q_values(torch.as_tensor(obs, device=device)[None]).argmax().item()
        t1 = time.perf_counter()
        action = env.action_space.sample()
        next_obs, reward, term, trunc, _ = env.step(action)
        replay.add(obs[-1], action, float(np.sign(reward)), term or trunc)
        obs = env.reset()[0] if term or trunc else next_obs
        t_act, t_env = t_act + t1 - t0, t_env + time.perf_counter() - t1
    t_env, t_act = t_env / fill, t_act / fill
    t0 = time.perf_counter()
    for _ in range(updates):
        replay.sample(base.batch_size, 0.4, base.jumps, base.n_step, base.gamma)
    t_sample = (time.perf_counter() - t0) / updates

    rows = {}
    for name, kw in [("spr eager", {}), ("no-spr eager", {"spr": False}),
                     *([("spr compile", {"compile": True}), ("no-spr compile", {"spr": False, "compile": True})]
                       if compile else [])]:
        try:
            rows[name] = time_updates(Args(env_id=env_id, **kw), replay, n_actions, device, updates, warmup)
        except Exception as e:  # torch.compile may be unavailable on a machine: report, don't hide
            rows[name] = (float("nan"), float("nan"))
            print(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        print(f"{name}: {rows[name][0] * 1000:.1f} ms/update (first {warmup} took {rows[name][1]:.1f} s)", flush=True)

    def project(per_update: float, steps: int) -> float:  # seconds: warm-up at env speed, then 2 updates/step
        warm = min(steps, base.learning_starts)
        return warm * t_env + (steps - warm) * (t_env + t_act + base.replay_ratio * per_update)

    lines = [f"# SPR timing: {env_id}, {device_name(device)}, torch {torch.__version__}", "",
             f"command: `python scripts/spr_benchmark.py timing --env-id {env_id} --updates {updates} "
             f"--warmup {warmup}{'' if compile else ' --no-compile'}{f' --threads {threads}' if threads else ''}`", "",
             f"- env step (random action, ALE + preprocessing + replay add): {t_env * 1000:.2f} ms",
             f"- acting forward (batch 1): {t_act * 1000:.2f} ms",
             f"- replay sample (batch {base.batch_size}, K={base.jumps}, n={base.n_step}): {t_sample * 1000:.2f} ms "
             "(included in the update times)", "",
             "| variant | ms / update | SPR part | steps/s after warm-up | 20k steps | 100k steps |",
             "|---|---|---|---|---|---|"]
    for name, (per_update, _) in rows.items():
        spr_part = ""
        if name.startswith("spr"):
            other = rows.get(name.replace("spr", "no-spr"), (float("nan"),))[0]
            spr_part = f"{(per_update - other) * 1000:.1f} ms ({(per_update - other) / per_update:.0%})"
        sps = 1 / (t_env + t_act + base.replay_ratio * per_update)
        lines.append(f"| {name} | {per_update * 1000:.1f} | {spr_part} | {sps:.2f} | "
                     f"{project(per_update, 20_000) / 3600:.2f} h | {project(per_update, 100_000) / 3600:.2f} h |")
    for kind in ("spr", "no-spr"):
        eager, comp = rows.get(f"{kind} eager"), rows.get(f"{kind} compile")
        if eager and comp:
            lines.append(f"\n{kind}: compile speed-up {eager[0] / comp[0]:.2f}x per update "
                         f"(compile + first {warmup} updates: {comp[1]:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(text)


def find_run(out_dir: pathlib.Path, algo: str, game: str, seed: int) -> pathlib.Path | None:
    runs = sorted(out_dir.glob(f"{algo}__{game}__{seed}__*"))
    return runs[-1] if runs else None


def compare(env_id: str = "BoxingNoFrameskip-v4", steps: int = 20_000, seed: int = 1, eval_episodes: int = 10,
            checkpoint_every: int = 1000, out_dir: str = "runs/spr_compare", parallel: bool = True, extra: str = ""):
    """Run SPR and --no-spr (DER) on the same game and seed, then `plot`. Rerun to resume.

    Args:
        env_id: the game.
        steps: agent steps per run.
        seed: seed of both runs.
        eval_episodes: final evaluation episodes (protocol: 100).
        checkpoint_every: steps between checkpoints (what a killed run resumes from).
        out_dir: where the two run directories go.
        parallel: both runs at once, each with half the CPU threads.
        extra: more flags for algos/spr.py as one string, e.g. --extra="--eval-every 5000".
    """
    game, out = game_name(env_id), pathlib.Path(out_dir)
    procs = []
    threads = str(max(1, (os.cpu_count() or 2) // (2 if parallel else 1)))
    for algo, flags in (("spr", []), ("der", ["--no-spr"])):
        run = find_run(out, algo, game, seed)
        cmd = [sys.executable, str(ROOT / "algos" / "spr.py"), "--env-id", env_id, "--seed", str(seed),
               "--total-steps", str(steps), "--eval-episodes", str(eval_episodes), "--output-dir", str(out),
               "--checkpoint-every", str(checkpoint_every), *flags, *shlex.split(extra)]
        if run is not None and (run / "checkpoint" / "trainer_state.pt").exists():
            cmd += ["--resume", str(run)]
        print(" ".join(cmd), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        p = subprocess.Popen(cmd, env=env, cwd=ROOT)
        if parallel:
            procs.append(p)
        else:
            p.wait()
    for p in procs:
        p.wait()
    plot(env_id=env_id, seed=seed, out_dir=out_dir)


def parse_phases(spec: str) -> list[tuple[str, str, int, int]]:
    """"name:lo-hi;spr=name:lo-hi" -> [("", name, lo, hi), ("spr", name, lo, hi)]; "": the whole run."""
    phases = []
    for item in filter(None, spec.split(";")):
        only, _, rest = item.rpartition("=")
        name, _, span = rest.partition(":")
        lo, hi = map(int, span.split("-"))
        phases.append((only, name, lo, hi))
    return phases or [("", "whole run", 0, 10**9)]


def speed_rows(lines: list[dict], first_full_window: int, lo: int, hi: int) -> tuple[float, float, float]:
    """Medians over the log windows ending in (lo, hi], from `first_full_window` on: steps/s, env ms/step,
    ms/update."""
    w = [x for x in lines if "perf/steps_per_s" in x and max(lo + 1, first_full_window) <= x["step"] <= hi]
    if not w:
        return float("nan"), float("nan"), float("nan")
    return tuple(float(np.median([x[k] for x in w])) * f for k, f in
                 (("perf/steps_per_s", 1), ("perf/env_s", 1e3), ("perf/update_s", 1e3)))


def plot(env_id: str = "BoxingNoFrameskip-v4", seed: int = 1, out_dir: str = "runs/spr_compare", hardware: str = "",
         tag: str = "", speed_phases: str = ""):
    """Learning curves (raw training game returns and their moving average; evaluations with error bars) and tables.

    Args:
        env_id: the game.
        seed: seed of the runs to plot.
        out_dir: where `compare` put the runs.
        hardware: what the runs ran on (default: this machine's CPU).
        tag: suffix of the file names in docs/spr/.
        speed_phases: "name:lo-hi;spr=name:lo-hi": step ranges whose speeds are reported apart (e.g. when a run
            was resumed with more threads), a "spr=" or "der=" prefix for one run only; default: the whole run.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    game, out = game_name(env_id), pathlib.Path(out_dir)
    DOCS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [f"# SPR vs DER (--no-spr) on {game}, seed {seed}: a SHORT run, not the 100k protocol", "",
            "| method | agent steps | final eval return (mean ± std, episodes) | eval HNS | random | "
            "last ≤10 training games | paper 100k |", "|---|---|---|---|---|---|---|"]
    paper = PAPER_100K.get(game, (float("nan"), float("nan")))
    evals, speeds = {}, {}  # label -> {step: eval record}; (algo, phase) -> speed_rows(...)
    for (algo, label), paper_score in zip(LABELS.items(), paper):
        run = find_run(out, algo, game, seed)
        if run is None:
            continue
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        ep = [(x["step"], x["train/episodic_return"]) for x in lines if "train/episodic_return" in x]
        if ep:
            s, r = map(np.array, zip(*ep))
            w = 10 if len(r) >= 50 else 3  # a Boxing game is ~1780 steps: a short run holds few games
            smooth = np.convolve(r, np.ones(w) / w, mode="valid") if len(r) >= w else r
            (line,) = ax.plot(s[len(s) - len(smooth):], smooth, label=f"{label}, training games ({w}-game mean)")
            ax.plot(s, r, ".", color=line.get_color(), alpha=0.4)
        ev = [x for x in lines if "eval/return_mean" in x]
        evals[label] = {x["step"]: x for x in ev}
        if ev:
            ax.errorbar([x["step"] for x in ev], [x["eval/return_mean"] for x in ev],
                        [x["eval/return_std"] for x in ev], fmt="o", capsize=3,
                        color=line.get_color() if ep else None, label=f"{label}, eval")
        perf = [x for x in lines if "perf/steps_per_s" in x]
        last = ev[-1] if ev else {}
        steps_done = max([perf[-1]["step"] if perf else 0] + [x["step"] for x in ev])
        eval_txt = (f"{last['eval/return_mean']:.1f} ± {last['eval/return_std']:.1f} ({last['eval/episodes']})"
                    if last else "-")
        hns = f"{human_normalized_score(game, last['eval/return_mean']):.3f}" if last else "-"
        rows.append(f"| {label} | {steps_done} | {eval_txt} | {hns} | {RANDOM_SCORES[game]} | "
                    f"{np.mean([r for _, r in ep[-10:]]) if ep else float('nan'):.1f} | {paper_score} |")
        run_args = json.loads((run / "args.json").read_text())
        # the first window of updates is left out (compilation and first allocations land there)
        first_full_window = run_args["learning_starts"] + 2 * run_args["log_every"]
        for only, name, lo, hi in parse_phases(speed_phases):
            if only in ("", algo):
                speeds[(algo, name)] = speed_rows(lines, first_full_window, lo, hi)
    ax.axhline(RANDOM_SCORES[game], color="gray", ls="--", label="random")
    ax.set(xlabel="agent steps", ylabel="game return (raw)", title=f"{game}: SPR vs DER, seed {seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / f"learning_curves_{game}{tag}.png", dpi=120)
    labels = list(evals)
    common = sorted(set.intersection(*(set(v) for v in evals.values()))) if evals else []
    if common:
        rows += ["", "Evaluations at the steps both runs reached (mean ± std of the raw return):", "",
                 "| agent steps | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        rows += [f"| {st} | " + " | ".join(f"{evals[k][st]['eval/return_mean']:.1f} ± {evals[k][st]['eval/return_std']:.1f}"
                                           for k in labels) + " |" for st in common]
    rows += ["", "Speed: medians over the 1000-step log windows after warm-up (a window holding an evaluation "
             "is slower). SPR part = SPR's update time minus DER's in the same phase.", "",
             "| method | phase | steps/s | env + acting ms/step | ms/update | SPR part ms/update |",
             "|---|---|---|---|---|---|"]
    for (algo, name), (sps, env_ms, upd_ms) in speeds.items():
        part = ""
        if algo == "spr" and ("der", name) in speeds:
            spr_ms = upd_ms - speeds[("der", name)][2]
            part = f"{spr_ms:.0f} ({spr_ms / upd_ms:.0%})"
        rows.append(f"| {LABELS[algo]} | {name} | {sps:.2f} | {env_ms:.1f} | {upd_ms:.0f} | {part} |")
    rows += ["", f"hardware: {hardware or device_name(torch.device('cpu'))}; "
             "paper column: 100k steps, mean of 10 seeds (SPR: spec §7; DER: mila-iqia/spr table). "
             f"Plot: learning_curves_{game}{tag}.png"]
    (DOCS / f"results_{game}{tag}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"timing": timing, "compare": compare, "plot": plot})

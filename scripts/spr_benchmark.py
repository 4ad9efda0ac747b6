"""SPR measurements: update timing, and SPR vs its two baselines over several seeds.

  python scripts/spr_benchmark.py timing                      # ms/update, env / update / SPR split, eager vs compile
  python scripts/spr_benchmark.py run --steps 5000 --seeds 1 2 3 4 --lock /tmp/cpu.lock   # resumable
  python scripts/spr_benchmark.py table --steps 5000 --seeds 1 2 3 --tag _cpu_5k        # -> docs/spr/
  python scripts/spr_benchmark.py plot --seed 1               # one seed's learning curves and speed table

Methods (all `algos/spr.py`, one code path): `spr`; `der_aug` = --no-spr, i.e. DER + augmentation (the SPR
paper's "Rainbow (controlled)" in its timing table); `der` = --no-spr --no-augmentation, DER without augmentation but with SPR's
other hyperparameters (n = 10, 2 updates per step, target copy every update; the original DER used n = 20,
1 update per step, a target update every 2000 steps and 1600 warm-up steps). `run` trains every (game, seed,
method), two runs at a time with one thread each, skips finished runs, resumes unfinished ones from their
checkpoints, and with --lock holds an exclusive flock on that file while the runs of one (game, seed) train.
`table` reports per method the mean final evaluation return over seeds with a t-based 95 % interval, and
the per-seed paired differences between methods (same seed = same warm-up data, initial weights and
evaluation games) with their interval, and whether the SPR loss fell during training.
`timing` fills a replay with real random-policy Atari steps, then times `algos.spr.update` (the exact
training update) with and without the SPR loss, eager and torch.compile'd, and projects a run's wall time.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import copy
import fcntl
import json
import math
import os
import platform
import shlex
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from algos.spr import Args, PrioritizedReplay, SPRNetwork, augment, compute_losses, update
from shared.atari import RANDOM_SCORES, game_name, human_normalized_score, make_env
from shared.stats import paired, t_interval, t_quantile  # noqa: F401  (t_quantile: the tests use it)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "spr"
METHODS = {  # run-name prefix (algos/spr.py) -> (label, flags)
    "spr": ("SPR", []),
    "der_aug": ("DER + augmentation (--no-spr)", ["--no-spr"]),
    "der": ("DER, no augmentation (--no-spr --no-augmentation)", ["--no-spr", "--no-augmentation"]),
}
# 100k-step scores, 10 seeds in the SPR paper. SPR: spec §7 (the paper's table). DER: the original DER
# (van Hasselt et al. 2019, no augmentation, its own hyperparameters) as tabulated in mila-iqia/spr
# src/rlpyt_utils.py (atari_der_scores). DER + augmentation: no per-game number was found to set beside it.
PAPER_100K = {
    "spr": {"Pong": -5.9, "Breakout": 17.1, "Boxing": 35.8, "Kangaroo": 3276.4, "UpNDown": 28138.5,
            "Frostbite": 1821.5, "CrazyClimber": 42923.6, "MsPacman": 1313.2, "Seaquest": 583.1, "Alien": 801.5,
            "RoadRunner": 14220.5, "Qbert": 669.1},
    "der": {"Alien": 739.9, "Amidar": 188.6, "Assault": 431.2, "Asterix": 470.8, "BankHeist": 51.0,
            "BattleZone": 10124.6, "Boxing": 0.2, "Breakout": 1.9, "ChopperCommand": 861.8,
            "CrazyClimber": 16185.3, "DemonAttack": 508.0, "Freeway": 27.9, "Frostbite": 866.8, "Gopher": 349.5,
            "Hero": 6857.0, "Jamesbond": 301.6, "Kangaroo": 779.3, "Krull": 2851.5, "KungFuMaster": 14346.1,
            "MsPacman": 1204.1, "Pong": -19.3, "PrivateEye": 97.8, "Qbert": 1152.9, "RoadRunner": 9600.0,
            "Seaquest": 354.1, "UpNDown": 2877.4},
    "der_aug": {},
}
PAPER_NAME = {"spr": "SPR", "der": "DER (original)", "der_aug": "none"}



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


def read_metrics(run: pathlib.Path) -> list[dict]:
    """metrics.jsonl; lines a resumed run logged again (same step and keys) keep their last value."""
    lines = {}
    for x in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(x)
        lines[(rec["step"], tuple(sorted(rec)))] = rec
    return sorted(lines.values(), key=lambda r: r["step"])


def final_eval(lines: list[dict], steps: int) -> dict | None:
    ev = [x for x in lines if "eval/return_mean" in x and x["step"] == steps]
    return ev[-1] if ev else None


def find_run(out_dir: pathlib.Path, algo: str, game: str, seed: int) -> pathlib.Path | None:
    runs = sorted(out_dir.glob(f"{algo}__{game}__{seed}__*"))
    return runs[-1] if runs else None


def run(games: list[str] = ["Boxing"], seeds: list[int] = [1, 2, 3], methods: list[str] = list(METHODS),
        steps: int = 5000, eval_episodes: int = 10, eval_every: int = 0, checkpoint_every: int = 1000,
        threads: int = 1, parallel: int = 2, lock: str = "", out_dir: str = "runs/spr_bench", extra: str = ""):
    """Train every (game, seed, method); finished runs are skipped, unfinished ones resumed from their checkpoint.

    Args:
        games: game names (Boxing) or env ids.
        seeds: seeds; each method runs every seed (paired comparisons).
        methods: any of spr, der_aug, der.
        steps: agent steps per run.
        eval_episodes: episodes of the final evaluation (protocol: 100).
        eval_every: also evaluate every this many steps (0: only at the end).
        checkpoint_every: steps between checkpoints (what an interrupted run resumes from).
        threads: torch threads of each run.
        parallel: runs of one (game, seed) at a time. Two one-thread runs use a 2-core CPU better than one
            two-thread run and do not stall when another process takes a core (two threads do, badly).
        lock: a file to flock exclusively while the runs of one (game, seed) train ("": no lock).
        out_dir: where the run directories go; `runs.jsonl` there records each run's wall time.
        extra: more flags for algos/spr.py as one string, e.g. --extra="--log-every 500".
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for game in games:
        env_id = game if "-v" in game else f"{game}NoFrameskip-v4"
        for seed in seeds:  # seed-major: an interrupted benchmark still holds complete pairs
            todo = []
            for algo in methods:
                prev = find_run(out, algo, game_name(env_id), seed)
                if prev is not None and final_eval(read_metrics(prev), steps) is not None:
                    print(f"done already: {prev}", flush=True)
                    continue
                cmd = [sys.executable, str(ROOT / "algos" / "spr.py"), "--env-id", env_id, "--seed", str(seed),
                       "--total-steps", str(steps), "--eval-episodes", str(eval_episodes), "--eval-every",
                       str(eval_every), "--checkpoint-every", str(checkpoint_every), "--output-dir", str(out),
                       *METHODS[algo][1], *shlex.split(extra)]
                if prev is not None and (prev / "checkpoint" / "trainer_state.pt").exists():
                    cmd += ["--resume", str(prev)]
                todo.append((algo, cmd))
            if not todo:
                continue
            with open(lock or os.devnull) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX) if lock else None
                running, failed = [], []
                while todo or running:
                    while todo and len(running) < parallel:
                        algo, cmd = todo.pop(0)
                        print(" ".join(cmd), flush=True)
                        running.append((algo, cmd, time.time(), subprocess.Popen(cmd, env=env, cwd=ROOT)))
                    time.sleep(1)
                    for job in [j for j in running if j[3].poll() is not None]:
                        running.remove(job)
                        algo, cmd, t0, proc = job
                        with open(out / "runs.jsonl", "a") as f:
                            f.write(json.dumps({"algo": algo, "game": game_name(env_id), "seed": seed, "steps": steps,
                                                "wall_s": time.time() - t0, "resumed": "--resume" in cmd,
                                                "returncode": proc.returncode, "threads": threads, "parallel": parallel,
                                                "end": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
                        if proc.returncode != 0:
                            failed.append(algo)
            if failed:
                raise SystemExit(f"{game} seed {seed}: {', '.join(failed)} failed")


@torch.no_grad()
def spr_probe(run: pathlib.Path, batches: int = 8, batch_size: int = 64, seed: int = 0) -> dict:
    """Does the run's transition model + predictor predict the future? With its final checkpoint and replay:
    the cosine between yhat_{t+k} (from o_t and a_t..a_{t+k-1}) and the target ytil_{t+k} of the real o_{t+k},
    against the cosine with the o_{t+k} of another sequence of the batch (shuffled), over k = 1..K and the
    sequences whose o_{t+k} is in the same episode; augmentation as in training. The SPR loss of a step is
    2 - 2 cos, so loss ratio = (1 - cos true) / (1 - cos shuffled) < 1 means the predictions carry
    information about the real future. DER runs, whose transition model and predictor never train, are the
    control (their target is the online net, as SPR's with tau = 0)."""
    saved = json.loads((run / "args.json").read_text())
    args = Args(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__})
    state = torch.load(run / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)
    n_actions = state["net"]["transition.conv1.weight"].shape[1] - 64
    net, target = SPRNetwork(n_actions, args), SPRNetwork(n_actions, args)
    net.load_state_dict(state["net"])
    target.load_state_dict(state["spr_target"] if args.spr else state["net"])
    replay = PrioritizedReplay(args.buffer_size, max(args.jumps, args.n_step), args.per_alpha, seed)
    replay.load_state_dict(torch.load(run / "checkpoint" / "replay.pt", weights_only=False))
    torch.manual_seed(seed)
    img = (lambda o: augment(o.float() / 255)) if args.augmentation else (lambda o: o.float() / 255)
    sums = np.zeros(3)
    for _ in range(batches):
        b = replay.sample(batch_size, args.per_beta, args.jumps, args.n_step, args.gamma)
        obs, actions, mask = (torch.as_tensor(b[k]) for k in ("obs", "actions", "spr_mask"))
        zhat, latents = net.encode(img(obs[:, 0])), []
        for k in range(args.jumps):
            zhat = net.transition(zhat, actions[:, k])
            latents.append(zhat)
        pred = net.predictor(net.head.project(torch.stack(latents, 1).flatten(0, 1))).view(batch_size, args.jumps, -1)
        ytil = target.head.project(target.encode(img(obs[:, 1:].flatten(0, 1)))).view(batch_size, args.jumps, -1)
        perm = torch.roll(torch.arange(batch_size), 1)  # every sequence paired with another one
        both = mask * mask[perm]
        sums += [float((F.cosine_similarity(pred, ytil, dim=-1) * both).sum()),
                 float((F.cosine_similarity(pred, ytil[perm], dim=-1) * both).sum()), float(both.sum())]
    cos_true, cos_shuffled = sums[0] / sums[2], sums[1] / sums[2]
    return {"cos_true": float(cos_true), "cos_shuffled": float(cos_shuffled),
            "loss_ratio": float((1 - cos_true) / (1 - cos_shuffled))}


def collect(out: pathlib.Path, games: list[str], seeds: list[int], methods: list[str], steps: int,
            previous: str = "") -> dict:
    """Per (game, method, seed): final eval, HNS, SPR/TD loss at the first and last log window, wall time.
    A run missing under `out` is taken from `previous` (an earlier table's JSON) when that holds it."""
    earlier = json.loads(pathlib.Path(previous).read_text())["runs"] if previous else {}
    if earlier and json.loads(pathlib.Path(previous).read_text())["steps"] != steps:
        raise SystemExit(f"{previous} reports runs of another length than --steps {steps}")
    walls = {}
    if (out / "runs.jsonl").exists():
        for x in map(json.loads, (out / "runs.jsonl").read_text().splitlines()):
            if x["steps"] == steps:
                key = (x["game"], x["algo"], x["seed"])
                walls[key] = walls.get(key, 0.0) + x["wall_s"]
    res = {}
    for game in games:
        for algo in methods:
            for seed in seeds:
                run_dir = find_run(out, algo, game, seed)
                lines = read_metrics(run_dir) if run_dir else []
                ev = final_eval(lines, steps)
                if ev is None:
                    if f"{game}|{algo}|{seed}" in earlier:
                        res[(game, algo, seed)] = {**earlier[f"{game}|{algo}|{seed}"], "from": previous}
                    continue
                train = [x for x in lines if "train/td_loss" in x]
                res[(game, algo, seed)] = {
                    "run": str(run_dir), "return": ev["eval/return_mean"], "return_std": ev["eval/return_std"],
                    "episodes": ev["eval/episodes"], "hns": human_normalized_score(game, ev["eval/return_mean"]),
                    "evals": {x["step"]: x["eval/return_mean"] for x in lines if "eval/return_mean" in x},
                    "spr_loss": [(x["step"], x["spr/loss"]) for x in train],
                    "td_loss": [(x["step"], x["train/td_loss"]) for x in train],
                    "wall_s": walls.get((game, algo, seed), float("nan")),
                    "probe": spr_probe(run_dir) if (run_dir / "checkpoint" / "replay.pt").exists() else None}
    return res


def fmt(mean: float, hw: float, digits: int = 1) -> str:
    return f"{mean:.{digits}f}" + ("" if math.isnan(hw) else f" ± {hw:.{digits}f}")


def table(games: list[str] = ["Boxing"], seeds: list[int] = [1, 2, 3], methods: list[str] = list(METHODS),
          steps: int = 5000, out_dir: str = "runs/spr_bench", tag: str = "", hardware: str = "",
          command: str = "", docs: str = str(DOCS), previous: str = "") -> dict:
    """Mean final evaluation over seeds with 95 % intervals, paired differences, SPR loss trend -> docs.

    Args:
        games: game names.
        seeds: the seeds to report (runs missing a final evaluation are left out and named).
        methods: methods to report.
        steps: agent steps of the runs to report.
        out_dir: where `run` put them.
        tag: suffix of the file names written to `docs`.
        hardware: what the runs ran on (default: this machine's CPU).
        command: the `run` command line, quoted in the report.
        docs: directory for benchmark{tag}.md / .json / .png.
        previous: an earlier table's JSON (e.g. docs/spr/benchmark_cpu_5k.json) to take the runs from whose
            directories are gone (their records, probe included, are copied as they were reported).
    """
    games = [game_name(g) if "-v" in g else g for g in games]
    res = collect(pathlib.Path(out_dir), games, seeds, methods, steps, previous)
    summary = {"steps": steps, "seeds": seeds, "runs": {"|".join(map(str, k)): v for k, v in res.items()},
               "methods": {}, "paired": {}, "spr_loss": {}}
    lines = [f"# SPR vs DER + augmentation vs DER on {', '.join(games)}: {steps} agent steps, seeds "
             f"{', '.join(map(str, seeds))}", "",
             "Final evaluation return per run (mean over its evaluation games), then mean over seeds with a "
             "t-based 95 % interval (n = number of seeds). The paper column is 100k steps, 10 seeds.", "",
             *(["**n = 1 (one seed per method): no interval can be computed and a single paired difference cannot "
                "separate two methods; every figure below describes that one seed only.**", ""]
               if len(seeds) < 2 else []),
             "| game | method | n | per seed | mean ± 95 % CI | HNS of the mean | random | paper 100k |",
             "|---|---|---|---|---|---|---|---|"]
    for game in games:
        for algo in methods:
            per = {s: res[(game, algo, s)]["return"] for s in seeds if (game, algo, s) in res}
            if not per:
                continue
            mean, hw = t_interval(list(per.values()))
            summary["methods"][f"{game}|{algo}"] = {"per_seed": per, "mean": mean, "ci": hw}
            paper = PAPER_100K[algo].get(game)
            lines.append(f"| {game} | {METHODS[algo][0]} | {len(per)} | " + ", ".join(f"{v:.1f}" for v in per.values())
                         + f" | {fmt(mean, hw)} | {human_normalized_score(game, mean):.2f} | {RANDOM_SCORES[game]} | "
                         + (f"{paper} ({PAPER_NAME[algo]})" if paper is not None else "—") + " |")
    lines += ["", "Paired differences (same seed: same warm-up data, initial weights and evaluation games); an "
              "interval that contains 0 does not separate the two methods:", "",
              "| game | difference | seeds | per seed | mean ± 95 % CI | separated? |", "|---|---|---|---|---|---|"]
    for game in games:
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                get = lambda m: {s: res[(game, m, s)]["return"] for s in seeds if (game, m, s) in res}
                d = paired(get(a), get(b))
                if not d["seeds"]:
                    continue
                summary["paired"][f"{game}|{a}-{b}"] = d
                sep = "—" if math.isnan(d["ci"]) else ("yes" if abs(d["mean"]) > d["ci"] else "no")
                lines.append(f"| {game} | {a} − {b} | {len(d['seeds'])} | " + ", ".join(f"{x:+.1f}" for x in d["diffs"])
                             + f" | {fmt(d['mean'], d['ci'])} | {sep} |")
    if len(games) > 1:  # per seed, the mean HNS over games, then the interval over seeds
        lines += ["", "| method | mean HNS over games, mean ± 95 % CI over seeds |", "|---|---|"]
        for algo in methods:
            hns = [np.mean([res[(g, algo, s)]["hns"] for g in games]) for s in seeds
                   if all((g, algo, s) in res for g in games)]
            if hns:
                lines.append(f"| {METHODS[algo][0]} | {fmt(*t_interval(hns), digits=3)} |")
    if "spr" in methods:
        lines += ["", "SPR loss (λ L_SPR, mean over the log window) in the first and the last window of training:", "",
                  "| game | seed | first window (step) | last window (step) | fell? | every window (step: loss) |",
                  "|---|---|---|---|---|---|"]
        for game in games:
            for s in seeds:
                r = res.get((game, "spr", s))
                if r and r["spr_loss"]:
                    (s0, l0), (s1, l1) = r["spr_loss"][0], r["spr_loss"][-1]
                    summary["spr_loss"][f"{game}|{s}"] = {"first": l0, "last": l1, "first_step": s0, "last_step": s1}
                    lines.append(f"| {game} | {s} | {l0:.3f} ({s0}) | {l1:.3f} ({s1}) | {'yes' if l1 < l0 else 'no'} | "
                                 + ", ".join(f"{st}: {v:.3f}" for st, v in r["spr_loss"]) + " |")
    probes = {k: r["probe"] for k, r in res.items() if r["probe"]}
    if probes:
        lines += ["", "Does the transition model predict the future? (`spr_probe`: final checkpoint, 512 sequences "
                  "from the run's replay; cosine of yhat_{t+k} with the target of the real o_{t+k} and with that of "
                  "another sequence; loss ratio = (1 - cos true) / (1 - cos shuffled), < 1: informative. The "
                  "DER runs never train their transition model and predictor: the control.)", "",
                  "| game | method | seed | cos true | cos shuffled | loss ratio |", "|---|---|---|---|---|---|"]
        for (g, m, sd), pr in sorted(probes.items(), key=lambda kv: (kv[0][0], methods.index(kv[0][1]), kv[0][2])):
            lines.append(f"| {g} | {METHODS[m][0]} | {sd} | {pr['cos_true']:.4f} | {pr['cos_shuffled']:.4f} | "
                         f"{pr['loss_ratio']:.3f} |")
    missing = [f"{g} {m} seed {s}" for g in games for m in methods for s in seeds if (g, m, s) not in res]
    walls = [r["wall_s"] for r in res.values() if not math.isnan(r["wall_s"])]
    lines += ["", f"Missing runs: {', '.join(missing) if missing else 'none'}."]
    reused = [f"{g} {a} seed {sd}" for (g, a, sd), r in res.items() if "from" in r]
    if reused:
        lines.append(f"Taken from `{previous}` (the same command's earlier runs, whose directories are gone): "
                     f"{', '.join(reused)}.")
    if walls:
        per_method = {m: sum(r["wall_s"] for k, r in res.items() if k[1] == m and not math.isnan(r["wall_s"]))
                      for m in methods}
        lines.append(f"Wall time of the runs (training + evaluation, from runs.jsonl): {sum(walls) / 3600:.2f} h in all ("
                     + ", ".join(f"{m} {v / 60:.0f} min" for m, v in per_method.items()) + ").")
    lines.append(f"Hardware: {hardware or device_name(torch.device('cpu'))}.")
    if command:
        lines.append(f"Command: `{command}`, then `python scripts/spr_benchmark.py table ...` for this file.")
    docs_dir = pathlib.Path(docs)
    docs_dir.mkdir(parents=True, exist_ok=True)
    (docs_dir / f"benchmark{tag}.md").write_text("\n".join(lines) + "\n")
    (docs_dir / f"benchmark{tag}.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    if res:
        plot_benchmark(res, games, seeds, methods, docs_dir / f"benchmark{tag}.png")
    print("\n".join(lines))
    return summary


def plot_benchmark(res: dict, games: list[str], seeds: list[int], methods: list[str], path: pathlib.Path):
    """Per game: the final evaluation of every seed and the mean ± CI per method; SPR and TD loss curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(games), 2, figsize=(11, 3.6 * len(games)), squeeze=False)
    for row, game in zip(axes, games):
        for x, algo in enumerate(methods):
            v = [res[(game, algo, s)]["return"] for s in seeds if (game, algo, s) in res]
            if v:
                mean, hw = t_interval(v)
                row[0].plot([x] * len(v), v, "o", alpha=0.5)
                row[0].errorbar([x + 0.15], [mean], [[0 if math.isnan(hw) else hw]], fmt="s", color="k", capsize=4)
        row[0].axhline(RANDOM_SCORES[game], color="gray", ls="--", label="random")
        row[0].set_xticks(range(len(methods)), [METHODS[m][0].split(" (")[0] for m in methods])
        row[0].set(ylabel="final eval return", title=f"{game}: seeds (dots), mean ± 95 % CI (squares)")
        row[0].legend()
        for s in seeds:
            r = res.get((game, "spr", s))
            if r and r["spr_loss"]:
                row[1].plot(*zip(*r["spr_loss"]), label=f"SPR loss, seed {s}")
        row[1].set(xlabel="agent steps", ylabel="λ L_SPR (log-window mean)", title=f"{game}: SPR loss")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def plot(env_id: str = "BoxingNoFrameskip-v4", seed: int = 1, out_dir: str = "runs/spr_bench", hardware: str = "",
         tag: str = "", speed_phases: str = ""):
    """Learning curves (raw training game returns and their moving average; evaluations with error bars) and tables.

    Args:
        env_id: the game.
        seed: seed of the runs to plot.
        out_dir: where `run` put the runs.
        hardware: what the runs ran on (default: this machine's CPU).
        tag: suffix of the file names in docs/spr/.
        speed_phases: "name:lo-hi;spr=name:lo-hi": step ranges whose speeds are reported apart (e.g. when a run
            was resumed with more threads), a "spr=", "der_aug=" or "der=" prefix for one run only; default: the whole run.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    game, out = game_name(env_id), pathlib.Path(out_dir)
    DOCS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [f"# {' vs '.join(METHODS[m][0] for m in METHODS)} on {game}, seed {seed}: a SHORT run, not the 100k protocol", "",
            "| method | agent steps | final eval return (mean ± std, episodes) | eval HNS | random | "
            "last ≤10 training games | paper 100k |", "|---|---|---|---|---|---|---|"]
    evals, speeds = {}, {}  # label -> {step: eval record}; (algo, phase) -> speed_rows(...)
    for algo, (label, _) in METHODS.items():
        run, paper_score = find_run(out, algo, game, seed), PAPER_100K[algo].get(game, "—")
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
    ax.set(xlabel="agent steps", ylabel="game return (raw)", title=f"{game}: seed {seed}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / f"learning_curves_{game}{tag}.png", dpi=120)
    labels = list(evals)
    common = sorted(set.intersection(*(set(v) for v in evals.values()))) if evals else []
    if common:
        rows += ["", "Evaluations at the steps all runs reached (mean ± std of the raw return):", "",
                 "| agent steps | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        rows += [f"| {st} | " + " | ".join(f"{evals[k][st]['eval/return_mean']:.1f} ± {evals[k][st]['eval/return_std']:.1f}"
                                           for k in labels) + " |" for st in common]
    rows += ["", "Speed: medians over the 1000-step log windows after warm-up (a window holding an evaluation "
             "is slower). SPR part = SPR's update time minus DER + augmentation's in the same phase.", "",
             "| method | phase | steps/s | env + acting ms/step | ms/update | SPR part ms/update |",
             "|---|---|---|---|---|---|"]
    for (algo, name), (sps, env_ms, upd_ms) in speeds.items():
        part = ""
        if algo == "spr" and ("der_aug", name) in speeds:  # the same update without the SPR loss
            spr_ms = upd_ms - speeds[("der_aug", name)][2]
            part = f"{spr_ms:.0f} ({spr_ms / upd_ms:.0%})"
        rows.append(f"| {METHODS[algo][0]} | {name} | {sps:.2f} | {env_ms:.1f} | {upd_ms:.0f} | {part} |")
    rows += ["", f"hardware: {hardware or device_name(torch.device('cpu'))}; "
             "paper column: 100k steps, mean of 10 seeds (SPR: spec §7; DER, original, no augmentation: "
             "mila-iqia/spr table; none for DER + augmentation). "
             f"Plot: learning_curves_{game}{tag}.png"]
    (DOCS / f"results_{game}{tag}.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"timing": timing, "run": run, "table": table, "plot": plot})

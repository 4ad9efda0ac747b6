"""HILP vs a random policy and goal-conditioned BC on self-collected maze data, with goal and reward prompting.

For each env: collect (or reuse) the offline dataset; train GCBC (the same Gaussian actor on (s, g),
hindsight goals uniform over the trajectory's future, the same number of gradient steps, batch size and
widths) and two HILP agents with `algos/hilp.py`'s main(): the paper's (z uniform on the sphere) and one
trained with the ZSRL code's recipe (half of z whitened features, E5 option). Goal reaching: the env's 5
fixed start/goal tasks. Reward prompting (E7): the env's reward tasks (4 directions, 5 cells to reach) from
every distinct task start, each agent prompted both the paper's way (x = phi(s') - phi(s), least squares)
and the ZSRL way (x = [phi(s'), 1], ridge), against a random policy, with the diagnostics of
`hilp.reward_prompting` (R^2, singular values, the state that maximises phi^T z). Several seeds on request.
Writes docs/hilp/results.md, results.json, phi_vs_bfs.png, trajectories.png.

  python scripts/hilp_benchmark.py            # the CPU budget reported in docs/hilp/results.md
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import dataclasses
import importlib.util
import json
import os
import platform
import time
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

from shared.maze import spearman  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hilp", ROOT / "algos" / "hilp.py")
hilp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hilp)


@dataclass
class Args:
    envs: list[str] = field(default_factory=lambda: ["maze2d-medium"])
    """environments to run (pointmaze-medium too: its MuJoCo reward-prompting rollouts take far longer than
    the 15-minute CPU budget of the default run)"""
    seeds: list[int] = field(default_factory=lambda: [2])
    """seeds for data, training and evaluation (maze2d: each seed collects its own dataset). Default 2: seed 1
    was used to choose `ridge`, so it is not the seed to report"""
    pointmaze_seeds: int = 1
    """PointMaze runs only the first this many seeds (its MuJoCo rollouts are slow)"""
    total_steps: int = 10_000
    """gradient steps for HILP and for GCBC (the paper uses 1M)"""
    batch_size: int = 256
    """batch size for both (paper: 1024)"""
    hidden_dim: int = 128
    """MLP width for both (paper: 512)"""
    num_layers: int = 2
    """MLP depth for both (paper: 3)"""
    maze2d_data: tuple[int, int] = (500, 500)
    """maze2d dataset: episodes x length (spec §5: ~500 x 500)"""
    pointmaze_data: tuple[int, int] = (300, 1000)
    """PointMaze dataset: episodes x length (spec §5 suggests ~1M transitions)"""
    maze2d_eval_episodes: int = 50
    """episodes per task / per reward and start on maze2d (spec: 50)"""
    pointmaze_eval_episodes: int = 10
    """episodes per task / per reward and start on PointMaze"""
    planning_num_states: int = 5_000
    """dataset states searched by HILP-Plan (paper code: 50,000)"""
    mix_ratio: float = 0.5
    """skill_mix_ratio of the second HILP agent (ZSRL code: 0.5); its whitening uses x = [phi(s'), 1] and `ridge`"""
    ridge: float = 1e-3
    """reward_prompt_ridge of the ridge prompts and of the whitening (chosen on seed 1 among 0, 1e-3, 1e-2, 1e-1,
    docs/hilp/ridge_selection_seed1.md)"""
    threads: int = 1
    """torch CPU threads"""
    device: str = "cpu"
    """torch device"""
    out_dir: str = "docs/hilp"
    """where the table and plots go"""
    runs_dir: str = "runs"
    """where the HILP runs and datasets go"""


AGENTS = {"HILP": {"skill_mix_ratio": 0.0}, "HILP, whitened z": {}}  # the second: mix_ratio, next features, ridge
PROMPTS = ["diff, LS", "diff, ridge", "next, ridge"]  # the paper's prompt, + ridge, the ZSRL code's features + ridge


def train_gcbc(data, steps, batch_size, hidden, layers, seed, device):
    """Goal-conditioned BC: max log pi(a | s, g), g = s_k with k uniform in [t+1, end of trajectory]."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    obs = torch.as_tensor(data["observations"], device=device)
    act = torch.as_tensor(data["actions"], device=device)
    traj_end = hilp.trajectory_ends(data["dones"])
    actor = hilp.Actor(2 * obs.shape[1], act.shape[1], hidden, layers).to(device)
    opt = torch.optim.Adam(actor.parameters(), lr=3e-4)
    for _ in range(steps):
        idx = rng.integers(len(traj_end), size=batch_size)
        lo = np.minimum(idx + 1, traj_end[idx])
        goal = lo + np.floor(rng.random(batch_size) * (traj_end[idx] - lo + 1)).astype(np.int64)
        loss = -actor.log_prob(torch.cat([obs[idx], obs[goal]], -1), act[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def policy(o, g):
        x = torch.cat([torch.as_tensor(o, device=device), torch.as_tensor(g, device=device)], -1)
        return actor.mean(x).clamp(-1, 1).cpu().numpy()
    return policy


def per_task(success, task_ids, n):
    return [float(success[task_ids == t].mean()) for t in range(n)]


def run_env(env_name, seed, a):
    pm = env_name.startswith("pointmaze")
    episodes, length = a.pointmaze_data if pm else a.maze2d_data
    eval_eps = a.pointmaze_eval_episodes if pm else a.maze2d_eval_episodes
    prompts = dict(zip(PROMPTS, ({"reward_prompt_feature": "diff", "reward_prompt_ridge": 0.0},
                                 {"reward_prompt_feature": "diff", "reward_prompt_ridge": a.ridge},
                                 {"reward_prompt_feature": "next", "reward_prompt_ridge": a.ridge})))
    base = hilp.Args(env=env_name, dataset="diverse", dataset_episodes=episodes, dataset_episode_len=length,
                     data_dir=os.path.join(a.runs_dir, "data"), seed=seed, output_dir=a.runs_dir,
                     total_steps=a.total_steps, eval_every=a.total_steps, checkpoint_every=a.total_steps,
                     log_every=500, eval_episodes=eval_eps, device=a.device, hidden_dim=a.hidden_dim,
                     num_layers=a.num_layers, batch_size=a.batch_size, planning_num_states=a.planning_num_states)
    env = hilp.make_env(env_name)
    t0 = time.time()
    data = hilp.get_dataset(env, base)  # collect (or reuse) once, outside the timed training
    times = {"data": time.time() - t0}
    out = {"env": env_name, "seed": seed, "dataset": f"diverse, {episodes} x {length} = {episodes * length} transitions",
           "eval_episodes": eval_eps, "success": {}, "success_per_task": {}, "prompting": {}, "details": {}, "runs": {}}
    task_ids = np.repeat(np.arange(len(env.tasks)), eval_eps)
    rng = np.random.default_rng(seed)
    rand = lambda o, g: rng.uniform(-1, 1, size=(len(o), env.act_dim))
    paths = {}
    for name, overrides in AGENTS.items():
        hargs = dataclasses.replace(base, **(overrides or {"skill_mix_ratio": a.mix_ratio, **prompts["next, ridge"]}))
        t0 = time.time()
        res = hilp.main(hargs)
        times[name] = time.time() - t0
        out["runs"][name] = res["run_dir"]
        for key, label in (("eval/success", name), ("eval/success_plan", f"{name} + plan")):
            out["success"][label] = res[key]
            out["success_per_task"][label] = [res[f"{key}_task{t}"] for t in range(len(env.tasks))]
        paths[name] = dict(np.load(os.path.join(res["run_dir"], "eval_paths.npz")))["goal"]
        for prompt, settings in prompts.items():  # every prompt for both agents
            metrics, details = hilp.reward_prompting(res["agent"], env, data, dataclasses.replace(hargs, **settings),
                                                     np.random.default_rng(seed + 12345))
            out["prompting"][f"{name} / {prompt}"] = metrics["eval/reward_success"]
            out["details"][f"{name} / {prompt}"] = details
        if name == "HILP":  # the paper's agent: random baseline of reward prompting, phi vs BFS below
            agent = res["agent"]
            if seed == a.seeds[0]:  # the ridge sweep on the first seed (how `ridge` was chosen)
                out["ridge_sweep"] = {f"{f}, {lam:g}": hilp.reward_prompting(
                    agent, env, data, dataclasses.replace(hargs, reward_prompt_feature=f, reward_prompt_ridge=lam),
                    np.random.default_rng(seed + 12345))[0]["eval/reward_success"]
                    for f in ("diff", "next") for lam in (0.0, 1e-3, 1e-2, 1e-1)}
            metrics, details = hilp.reward_prompting(agent, env, data, base, np.random.default_rng(seed + 12345), act=rand)
            out["prompting"]["random"] = metrics["eval/reward_success"]
            out["details"]["random"] = details
    t0 = time.time()
    gcbc = train_gcbc(data, a.total_steps, a.batch_size, a.hidden_dim, a.num_layers, seed, torch.device(a.device))
    times["GCBC"] = time.time() - t0
    s_gcbc, paths["GCBC"], _ = env.rollout(gcbc, task_ids, seed=seed)
    s_rand, paths["random"], _ = env.rollout(rand, task_ids, seed=seed)
    out["success"].update({"GCBC": float(s_gcbc.mean()), "random": float(s_rand.mean())})
    out["success_per_task"].update({"GCBC": per_task(s_gcbc, task_ids, len(env.tasks)),
                                    "random": per_task(s_rand, task_ids, len(env.tasks))})
    # phi distance vs BFS distance on random dataset pairs (the paper's agent)
    prng = np.random.default_rng(seed + 7)
    i, j = prng.integers(len(data["observations"]), size=(2, 3000))
    oi, oj = data["observations"][i], data["observations"][j]
    dev = torch.device(a.device)
    dphi = (agent.embed(torch.as_tensor(oi, device=dev)) - agent.embed(torch.as_tensor(oj, device=dev))).norm(dim=-1).cpu().numpy()
    dtrue = env.geodesic(oi, oj)
    out.update({"phi_spearman": spearman(dphi, dtrue),
                "euclid_spearman": spearman(np.linalg.norm(oi[:, :2] - oj[:, :2], axis=-1), dtrue), "time_s": times})
    plots = {"dphi": dphi, "dtrue": dtrue, "paths": paths, "task_ids": task_ids, "env": env}
    return out, plots


def plot(results, plots, out_dir):
    k = len(results)
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 4), squeeze=False)
    for ax, r, p in zip(axes[0], results, plots):
        ax.scatter(p["dtrue"], p["dphi"], s=3, alpha=0.3)
        ax.set_xlabel("BFS shortest-path distance (2D-maze steps)")
        ax.set_ylabel("||phi(s) - phi(g)||")
        ax.set_title(f"{r['env']}: Spearman {r['phi_spearman']:.3f} (Euclid {r['euclid_spearman']:.3f})")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "phi_vs_bfs.png"), dpi=110)
    plt.close(fig)

    methods = ["HILP", "HILP, whitened z", "GCBC", "random"]
    fig, axes = plt.subplots(k, len(methods), figsize=(4.2 * len(methods), 4.2 * k), squeeze=False)
    colors = plt.cm.tab10(np.arange(10))
    for row, (r, p) in enumerate(zip(results, plots)):
        env = p["env"]
        for col, m in enumerate(methods):
            ax = axes[row, col]
            for x, y, w, h in env.walls():
                ax.add_patch(patches.Rectangle((x, y), w, h, color="0.3"))
            for t in range(len(env.tasks)):
                path = p["paths"][m][np.nonzero(p["task_ids"] == t)[0][0]]
                ax.plot(path[:, 0], path[:, 1], color=colors[t], lw=1)
                ax.plot(*path[0], "o", color=colors[t], ms=5)
                goal = env.cell_center(env.tasks[t][1]) if hasattr(env, "cell_center") else \
                    env.from_grid(env.grid_maze.cell_center(env.tasks[t][1]))
                ax.plot(*goal, "*", color=colors[t], ms=12, mec="k")
            ax.set_aspect("equal")
            ax.autoscale()
            if not r["env"].startswith("pointmaze"):
                ax.invert_yaxis()  # row 0 at the top, like the printed map
            ax.set_title(f"{r['env']} {m}: {100 * r['success'][m]:.0f}% success", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "trajectories.png"), dpi=110)
    plt.close(fig)


def cpu_name():
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def pct(x):
    return "—" if x is None or np.isnan(x) else f"{100 * x:.1f}%"


def write_table(results, a, wall_s, out_dir):
    seeds = sorted({r["seed"] for r in results})
    lines = ["# HILP on self-collected maze data: goal and reward prompting", "",
             f"Command: `python scripts/hilp_benchmark.py{''.join(' ' + x for x in sys.argv[1:])}` "
             f"(seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
             f"{f'; PointMaze: seed {a.seeds[0]} only' if any(e.startswith('pointmaze') for e in a.envs) else ''}). "
             f"Budget per env, seed and method: {a.total_steps} gradient steps, batch {a.batch_size}, MLPs "
             f"{a.num_layers}x{a.hidden_dim} (paper: 1M steps, batch 1024, 3x512). HILP-Plan searches "
             f"{a.planning_num_states} dataset states (paper code: 50,000). GCBC: the same actor on (s, g), goals "
             "uniform over the trajectory's future, same steps/batch/width/lr. 'HILP, whitened z': the same "
             f"training with a share {a.mix_ratio} of z drawn as whitened features (E5 option, ZSRL code), x = "
             f"[phi(s'), 1], ridge {a.ridge}. Reward prompts: 'diff, LS' = the paper's (x = phi(s') - phi(s), least "
             f"squares), 'diff, ridge' and 'next, ridge' (x = [phi(s'), 1], the ZSRL code's features) with ridge "
             f"{a.ridge} x the mean eigenvalue of X^T X, chosen before this run on seed 1 with the first agent among 0, "
             "1e-3, 1e-2, 1e-1 (ridge_selection_seed1.md)" + (": seed 1's ridge columns carry that selection." if 1 in seeds
                                                               else "; seed 1 is not reported here."),
             f"Hardware: {cpu_name()}, {os.cpu_count()} cores visible, {a.threads} torch thread(s), device {a.device} "
             f"(the 2-core development machine was shared with other jobs); torch {torch.__version__}. "
             f"Whole script: {wall_s / 60:.1f} min.",
             "", "## Goal-reaching success (5 fixed start/goal tasks spanning each maze)", "",
             "| env | seed | data | episodes/task | random | GCBC | HILP | HILP + plan | HILP, whitened z | + plan |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    cols = ["random", "GCBC", "HILP", "HILP + plan", "HILP, whitened z", "HILP, whitened z + plan"]
    for r in results:
        lines.append(f"| {r['env']} | {r['seed']} | {r['dataset']} | {r['eval_episodes']} | "
                     + " | ".join(pct(r["success"][c]) for c in cols) + " |")
    lines += ["", "Per task (tasks 0-4, the last is the longest diagonal of the maze):", "",
              "| env | seed | method | task 0 | task 1 | task 2 | task 3 | task 4 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in cols:
            lines.append(f"| {r['env']} | {r['seed']} | {m} | " + " | ".join(f"{100 * x:.0f}%" for x in r["success_per_task"][m]) + " |")
    lines += ["", "## Reward prompting (E7)", "",
              "Each reward task is run from every distinct start cell of the 5 goal tasks, "
              "episodes/task episodes each, for the env's horizon with z fixed; success = the episode ends in the "
              "reward's target region (directions: the extreme free column or row; reach_r_c: that cell); episodes "
              "that start in it are left out. z from 10,000 reward-labelled dataset transitions. Mean success "
              "over the 9 rewards:", "",
              "| env | seed | random | " + " | ".join(f"{ag} / {pr}" for ag in AGENTS for pr in PROMPTS) + " |",
              "|---|---|---|" + "---|" * (len(AGENTS) * len(PROMPTS))]
    for r in results:
        lines.append(f"| {r['env']} | {r['seed']} | {pct(r['prompting']['random'])} | "
                     + " | ".join(pct(r["prompting"][f"{ag} / {pr}"]) for ag in AGENTS for pr in PROMPTS) + " |")
    for r in results:
        if "ridge_sweep" in r:
            lines += ["", f"Ridge sweep, {r['env']} seed {r['seed']}, the first agent (mean success over the rewards; "
                      + ("the seed `--ridge` was chosen on" if r["seed"] == 1 else "a check of the choice made on seed 1,"
                         " not a selection") + "):", "", "| x | ridge 0 | 1e-3 | 1e-2 | 1e-1 |", "|---|---|---|---|---|"]
            for f in ("diff", "next"):
                lines.append(f"| {f} | " + " | ".join(pct(r["ridge_sweep"][f"{f}, {lam:g}"]) for lam in (0.0, 1e-3, 1e-2, 1e-1)) + " |")
    keys = ["random"] + [f"{ag} / {pr}" for ag in AGENTS for pr in PROMPTS]
    lines += ["", "Per reward: success, and in brackets R^2 of the fit, whether the sampled dataset state with the "
              "largest phi^T z lies in the target region (where z points), and the size of the policy's reward "
              "(phi(s') - phi(s))^T z for this z relative to a random unit z (signal):", ""]
    for r in results:
        names = [k for k in r["details"]["random"] if isinstance(r["details"]["random"][k], dict)]
        lines += [f"{r['env']}, seed {r['seed']}:", "", "| reward | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for n in names:
            cells = [pct(r["details"]["random"][n]["success"])]
            for k in keys[1:]:
                d = r["details"][k][n]
                cells.append(f"{pct(d['success'])} ({d['r2']:.2f}, {'in' if d['argmax_in_target'] else 'out'}, "
                             f"{d['signal']:.2f})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Singular values of the regression features X (10,000 samples; largest, 2nd, 4th, 8th, 16th, smallest; "
              "condition number). phi is the same for both agents (its loss does not involve z).", "",
              "| env | seed | X | singular values | condition |", "|---|---|---|---|---|"]
    for r in results:
        for k, label in (("HILP / diff, LS", "phi(s') - phi(s)"), ("HILP / next, ridge", "phi(s') centred")):
            sv = np.array(r["details"][k]["singular_values"])
            lines.append(f"| {r['env']} | {r['seed']} | {label} | " + ", ".join(f"{sv[i]:.3g}" for i in (0, 1, 3, 7, 15, -1))
                         + f" | {sv[0] / max(sv[-1], 1e-12):.3g} |")
    lines += ["", "## phi vs true distance (3000 random dataset pairs, the paper's agent; see phi_vs_bfs.png)", "",
              "The BFS distance is the xy shortest path on a 0.2-cell grid; for PointMaze it ignores velocity, which "
              "is part of the true temporal distance there (two states at one place moving opposite ways are apart).", "",
              "| env | seed | Spearman(||phi(s)-phi(g)||, BFS distance) | Spearman(Euclidean xy distance, BFS distance) |",
              "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['env']} | {r['seed']} | {r['phi_spearman']:.3f} | {r['euclid_spearman']:.3f} |")
    lines += ["", "## Time (seconds; HILP = training + its evaluations)", "",
              "| env | seed | data collection | HILP | HILP, whitened z | GCBC train |", "|---|---|---|---|---|---|"]
    for r in results:
        t = r["time_s"]
        lines.append(f"| {r['env']} | {r['seed']} | {t['data']:.0f} | {t['HILP']:.0f} | {t['HILP, whitened z']:.0f} | {t['GCBC']:.0f} |")
    lines += ["", "Plots: `phi_vs_bfs.png` (phi distance vs BFS distance), `trajectories.png` (first episode of "
              "every task, first seed; dots = starts, stars = goals).", ""]
    open(os.path.join(out_dir, "results.md"), "w").write("\n".join(lines))


def main(a):
    torch.set_num_threads(a.threads)
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.time()
    results, plots = [], []
    for env_name in a.envs:
        for seed in a.seeds[: a.pointmaze_seeds] if env_name.startswith("pointmaze") else a.seeds:
            r, p = run_env(env_name, seed, a)
            results.append(r)
            if seed == a.seeds[0]:
                plots.append(p)
            print(json.dumps({k: r[k] for k in ("env", "seed", "success", "prompting", "phi_spearman", "time_s")}), flush=True)
    wall = time.time() - t0
    json.dump({"args": vars(a), "results": results, "wall_s": wall}, open(os.path.join(a.out_dir, "results.json"), "w"), indent=1)
    write_table(results, a, wall, a.out_dir)
    plot([r for r in results if r["seed"] == a.seeds[0]], plots, a.out_dir)
    print(open(os.path.join(a.out_dir, "results.md")).read())


if __name__ == "__main__":
    main(tyro.cli(Args))

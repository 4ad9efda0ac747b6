"""HILP vs a random policy and goal-conditioned BC on self-collected maze data (issue 6).

For each env: collect (or reuse) the offline dataset, train HILP with `algos/hilp.py`'s main(), train GCBC
(the same Gaussian actor on (s, g), hindsight goals uniform over the trajectory's future, the same
number of gradient steps, batch size and widths) on the same data, then evaluate all on the env's 5
fixed start/goal tasks. Writes docs/hilp/results.md, results.json, phi_vs_bfs.png, trajectories.png.

  python scripts/hilp_benchmark.py            # the CPU budget reported in docs/hilp/results.md
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

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
    envs: list[str] = field(default_factory=lambda: ["maze2d-medium", "pointmaze-medium"])
    """environments to run"""
    seed: int = 1
    """seed for data, training and evaluation"""
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
    """episodes per task on maze2d (spec: 50)"""
    pointmaze_eval_episodes: int = 10
    """episodes per task on PointMaze"""
    planning_num_states: int = 5_000
    """dataset states searched by HILP-Plan (paper code: 50,000)"""
    threads: int = 1
    """torch CPU threads"""
    device: str = "cpu"
    """torch device"""
    out_dir: str = "docs/hilp"
    """where the table and plots go"""
    runs_dir: str = "runs"
    """where the HILP runs and datasets go"""


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


def run_env(env_name, a):
    pm = env_name.startswith("pointmaze")
    episodes, length = a.pointmaze_data if pm else a.maze2d_data
    eval_eps = a.pointmaze_eval_episodes if pm else a.maze2d_eval_episodes
    hargs = hilp.Args(env=env_name, dataset="diverse", dataset_episodes=episodes, dataset_episode_len=length,
                      data_dir=os.path.join(a.runs_dir, "data"), seed=a.seed, output_dir=a.runs_dir,
                      total_steps=a.total_steps, eval_every=a.total_steps, checkpoint_every=a.total_steps,
                      log_every=500, eval_episodes=eval_eps, device=a.device, hidden_dim=a.hidden_dim,
                      num_layers=a.num_layers, batch_size=a.batch_size, planning_num_states=a.planning_num_states)
    env = hilp.make_env(env_name)
    t0 = time.time()
    hilp.get_dataset(env, hargs)  # collect (or reuse) once, outside the timed training
    t_data = time.time() - t0
    t0 = time.time()
    res = hilp.main(hargs)
    t_hilp = time.time() - t0
    data, agent = res["data"], res["agent"]
    t0 = time.time()
    gcbc = train_gcbc(data, a.total_steps, a.batch_size, a.hidden_dim, a.num_layers, a.seed, torch.device(a.device))
    t_gcbc = time.time() - t0
    task_ids = np.repeat(np.arange(len(env.tasks)), eval_eps)
    s_gcbc, p_gcbc, _ = env.rollout(gcbc, task_ids, seed=a.seed)
    rng = np.random.default_rng(a.seed)
    rand = lambda o, g: rng.uniform(-1, 1, size=(len(o), env.act_dim))
    s_rand, p_rand, _ = env.rollout(rand, task_ids, seed=a.seed)
    start_ids = np.full(eval_eps, len(env.tasks) - 1)  # as in hilp.evaluate
    rand_returns = {k: float(env.rollout(rand, start_ids, seed=a.seed, reward_fn=fn)[2].mean())
                    for k, fn in env.reward_fns().items()}
    paths = dict(np.load(os.path.join(res["run_dir"], "eval_paths.npz")))
    # phi distance vs BFS distance on random dataset pairs
    prng = np.random.default_rng(a.seed + 7)
    i, j = prng.integers(len(data["observations"]), size=(2, 3000))
    oi, oj = data["observations"][i], data["observations"][j]
    dev = torch.device(a.device)
    dphi = (agent.embed(torch.as_tensor(oi, device=dev)) - agent.embed(torch.as_tensor(oj, device=dev))).norm(dim=-1).cpu().numpy()
    dtrue = env.geodesic(oi, oj)
    n = len(env.tasks)
    out = {
        "env": env_name, "dataset": f"diverse, {episodes} x {length} = {episodes * length} transitions",
        "eval_episodes_per_task": eval_eps, "run_dir": res["run_dir"],
        "time_s": {"data": t_data, "hilp_train_and_eval": t_hilp, "gcbc_train": t_gcbc},
        "success": {
            "HILP": res["eval/success"], "HILP-Plan": res["eval/success_plan"],
            "GCBC": float(s_gcbc.mean()), "random": float(s_rand.mean())},
        "success_per_task": {
            "HILP": [res[f"eval/success_task{t}"] for t in range(n)],
            "HILP-Plan": [res[f"eval/success_plan_task{t}"] for t in range(n)],
            "GCBC": per_task(s_gcbc, task_ids, n), "random": per_task(s_rand, task_ids, n)},
        "reward_return": {"HILP": {k.split("/")[-1]: v for k, v in res.items() if k.startswith("eval/reward_return/")},
                          "random": rand_returns},
        "phi_spearman": spearman(dphi, dtrue),
        "euclid_spearman": spearman(np.linalg.norm(oi[:, :2] - oj[:, :2], axis=-1), dtrue),
    }
    plots = {"dphi": dphi, "dtrue": dtrue, "paths": {"HILP": paths["goal"], "GCBC": p_gcbc, "random": p_rand},
             "task_ids": task_ids, "env": env}
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

    methods = ["HILP", "GCBC", "random"]
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
            ax.set_title(f"{r['env']} {m}: {100 * r['success'][m]:.0f}% success")
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


def write_table(results, a, wall_s, out_dir):
    lines = ["# HILP on self-collected maze data", "",
             f"Command: `python scripts/hilp_benchmark.py` (seed {a.seed}). Budget per env and method: "
             f"{a.total_steps} gradient steps, batch {a.batch_size}, MLPs {a.num_layers}x{a.hidden_dim} "
             f"(paper: 1M steps, batch 1024, 3x512). HILP-Plan searches {a.planning_num_states} dataset states "
             "(paper code: 50,000). GCBC: the same actor on (s, g), goals uniform over the trajectory's future, "
             "same steps/batch/width/lr.",
             f"Hardware: {cpu_name()}, {os.cpu_count()} cores visible, {a.threads} torch thread(s), device {a.device} "
             f"(the 2-core development machine was shared with other jobs); torch {torch.__version__}. "
             f"Whole script: {wall_s / 60:.1f} min.",
             "", "## Goal-reaching success (5 fixed start/goal tasks spanning each maze)", "",
             "| env | data | episodes/task | random | GCBC | HILP | HILP-Plan |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["success"]
        lines.append(f"| {r['env']} | {r['dataset']} | {r['eval_episodes_per_task']} | {100 * s['random']:.1f}% | "
                     f"{100 * s['GCBC']:.1f}% | {100 * s['HILP']:.1f}% | {100 * s['HILP-Plan']:.1f}% |")
    lines += ["", "Per task (tasks 0-4, the last is the longest diagonal of the maze):", "",
              "| env | method | task 0 | task 1 | task 2 | task 3 | task 4 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for m, v in r["success_per_task"].items():
            lines.append(f"| {r['env']} | {m} | " + " | ".join(f"{100 * x:.0f}%" for x in v) + " |")
    lines += ["", "## phi vs true distance (3000 random dataset pairs; see phi_vs_bfs.png)", "",
              "The BFS distance is the xy shortest path on a 0.2-cell grid; for PointMaze it ignores velocity, which "
              "is part of the true temporal distance there (two states at one place moving opposite ways are apart).", "",
              "| env | Spearman(||phi(s)-phi(g)||, BFS distance) | Spearman(Euclidean xy distance, BFS distance) |",
              "|---|---|---|"]
    for r in results:
        lines.append(f"| {r['env']} | {r['phi_spearman']:.3f} | {r['euclid_spearman']:.3f} |")
    lines += ["", "## Reward prompting (z by least squares on phi(s')-phi(s), 10,000 labelled transitions)", "",
              "Mean undiscounted return over one episode of the env's horizon, starting from the longest task's start cell; reach_far_cell pays 1 per step within the goal radius of that task's goal cell.", "",
              "| env | reward | random | HILP |", "|---|---|---|---|"]
    for r in results:
        for k, v in r["reward_return"]["HILP"].items():
            lines.append(f"| {r['env']} | {k} | {r['reward_return']['random'][k]:.2f} | {v:.2f} |")
    lines += ["", "## Time (seconds)", "", "| env | data collection | HILP train + eval | GCBC train |", "|---|---|---|---|"]
    for r in results:
        t = r["time_s"]
        lines.append(f"| {r['env']} | {t['data']:.0f} | {t['hilp_train_and_eval']:.0f} | {t['gcbc_train']:.0f} |")
    lines += ["", "Plots: `phi_vs_bfs.png` (phi distance vs BFS distance), `trajectories.png` (first episode of "
              "every task; dots = starts, stars = goals).", ""]
    open(os.path.join(out_dir, "results.md"), "w").write("\n".join(lines))


def main(a):
    torch.set_num_threads(a.threads)
    os.makedirs(a.out_dir, exist_ok=True)
    t0 = time.time()
    results, plots = [], []
    for env_name in a.envs:
        r, p = run_env(env_name, a)
        results.append(r)
        plots.append(p)
        print(json.dumps({k: r[k] for k in ("env", "success", "phi_spearman", "time_s")}), flush=True)
    wall = time.time() - t0
    json.dump({"args": vars(a), "results": results, "wall_s": wall}, open(os.path.join(a.out_dir, "results.json"), "w"), indent=2)
    write_table(results, a, wall, a.out_dir)
    plot(results, plots, a.out_dir)
    print(open(os.path.join(a.out_dir, "results.md")).read())


if __name__ == "__main__":
    main(tyro.cli(Args))

"""A continuous 2D maze in numpy, with known geodesic distances, dataset collectors and a batched
goal-reaching evaluator. Plumbing for `algos/hilp.py` (and any offline goal-conditioned RL file).

Geometry. A cell map (0 free, 1 wall) like D4RL's maze2d/antmaze maps; cell (i, j) covers
x in [j, j+1), y in [i, i+1) (x = column, y = row, unit cells). State s = (x, y), action a in [-1, 1]^2,
s' = s + step_size * a with wall collisions handled by `substeps` axis-wise sub-moves (a blocked
axis stays, the other slides). Deterministic, so the shortest number of steps between two states is
known: the box action moves up to step_size along each axis at once, so a BFS with 8-connectivity on a
grid of step_size cells gives the step count d*(s, g) (`geodesic`, ground truth for phi).

Datasets are flat arrays (the D4RL layout): observations [N, obs_dim], actions [N, act_dim],
next_observations [N, obs_dim], dones [N] with 1.0 on the LAST transition of every trajectory. They are
written as plain .npz files with exactly these keys (`save_dataset` / `load_dataset`).
"""

import os

import numpy as np

MAZES = {  # 1 = wall, 0 = free; the same maps as D4RL / gymnasium-robotics
    "umaze": [
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 0, 1],
        [1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1],
    ],
    "medium": [
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 1, 1, 0, 0, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 0, 0, 1, 0, 1],
        [1, 0, 0, 0, 1, 0, 0, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ],
    "large": [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
        [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
}

# Fixed evaluation tasks (start cell, goal cell) as (row, col), spanning each maze; the longest last.
TASKS = {
    "umaze": [((1, 1), (1, 3)), ((1, 3), (3, 3)), ((3, 3), (1, 2)), ((3, 2), (1, 2)), ((1, 1), (3, 1))],
    "medium": [((1, 1), (2, 5)), ((6, 1), (1, 1)), ((6, 6), (2, 4)), ((4, 6), (6, 3)), ((1, 1), (6, 6))],
    "large": [((1, 1), (1, 10)), ((7, 1), (5, 4)), ((7, 10), (1, 6)), ((5, 9), (7, 4)), ((1, 1), (7, 10))],
}


def save_dataset(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **{k: data[k] for k in ("observations", "actions", "next_observations", "dones")})


def load_dataset(path):
    with np.load(path) as f:
        data = {k: f[k].astype(np.float32) for k in ("observations", "actions", "next_observations", "dones")}
    assert data["dones"][-1] == 1.0, "the last transition must end a trajectory"
    return data


def _stack_trajectories(trajs):
    """trajs: list of (obs [T+1, d], actions [T, k]) -> flat D4RL-style dict."""
    out = {"observations": [], "actions": [], "next_observations": [], "dones": []}
    for obs, act in trajs:
        out["observations"].append(obs[:-1])
        out["next_observations"].append(obs[1:])
        out["actions"].append(act)
        dones = np.zeros(len(act), np.float32)
        dones[-1] = 1.0
        out["dones"].append(dones)
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


class Maze2D:
    """Vectorised continuous maze. All position arrays are [..., 2] in (x, y) maze units."""

    def __init__(self, name="medium", step_size=0.2, substeps=4, horizon=500, goal_radius=0.5):
        self.name = name
        self.grid = np.array(MAZES[name], dtype=np.int64)
        self.step_size, self.substeps, self.horizon, self.goal_radius = step_size, substeps, horizon, goal_radius
        self.obs_dim, self.act_dim = 2, 2
        self.tasks = TASKS[name]
        self.free_cells = [tuple(c) for c in np.argwhere(self.grid == 0)]
        self._cell_next = None
        self._fine = None

    # ---------- geometry ----------
    def cell_center(self, cells):
        cells = np.asarray(cells, dtype=np.float64)
        return np.stack([cells[..., 1] + 0.5, cells[..., 0] + 0.5], -1)

    def xy_to_cell(self, xy):
        xy = np.asarray(xy)
        return np.floor(xy[..., 1]).astype(np.int64), np.floor(xy[..., 0]).astype(np.int64)

    def is_free(self, xy):
        i, j = self.xy_to_cell(xy)
        h, w = self.grid.shape
        inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        return inside & (self.grid[np.clip(i, 0, h - 1), np.clip(j, 0, w - 1)] == 0)

    def step(self, xy, action):
        """s' = s + step_size * clip(a), sub-stepped; a move into a wall is cancelled per axis."""
        xy = np.array(xy, dtype=np.float64)
        delta = self.step_size * np.clip(action, -1.0, 1.0) / self.substeps
        for _ in range(self.substeps):
            for axis in (0, 1):
                trial = xy.copy()
                trial[..., axis] += delta[..., axis]
                ok = self.is_free(trial)
                xy[ok] = trial[ok]
        return xy

    def sample_free(self, n, rng, cells=None, noise=0.5):
        """Uniform points in the given (default: all) free cells; noise < 0.5 keeps them off the walls."""
        cells = np.asarray(self.free_cells if cells is None else cells)
        pick = cells[rng.integers(len(cells), size=n)]
        return self.cell_center(pick) + rng.uniform(-noise, noise, size=(n, 2)) * 0.999

    # ---------- shortest paths ----------
    def _cell_next_table(self):
        """next_cell[a, b] = the 4-neighbour of free cell a on a shortest cell path to free cell b."""
        if self._cell_next is None:
            idx = {c: k for k, c in enumerate(self.free_cells)}
            n = len(self.free_cells)
            dist = np.full((n, n), 10**6, np.int64)
            for b, cb in enumerate(self.free_cells):  # BFS from every goal cell (tiny graphs)
                dist[b, b], queue = 0, [cb]
                while queue:
                    c = queue.pop(0)
                    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        nb = (c[0] + di, c[1] + dj)
                        if nb in idx and dist[b, idx[nb]] > dist[b, idx[c]] + 1:
                            dist[b, idx[nb]] = dist[b, idx[c]] + 1
                            queue.append(nb)
            nxt = np.zeros((n, n), np.int64)
            for a, ca in enumerate(self.free_cells):
                nbs = [idx[(ca[0] + di, ca[1] + dj)] for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))
                       if (ca[0] + di, ca[1] + dj) in idx]
                for b in range(n):
                    nxt[a, b] = a if a == b else min(nbs, key=lambda k: dist[b, k])
            self._cell_idx, self._cell_next = idx, nxt
        return self._cell_idx, self._cell_next

    def next_waypoint(self, xy, goal_xy):
        """Centre of the next cell on a shortest cell path (the goal itself once in its cell)."""
        idx, nxt = self._cell_next_table()
        ci, cj = self.xy_to_cell(xy)
        gi, gj = self.xy_to_cell(goal_xy)
        a = np.array([idx[(i, j)] for i, j in zip(ci, cj)])
        b = np.array([idx[(i, j)] for i, j in zip(gi, gj)])
        way = self.cell_center(np.array(self.free_cells)[nxt[a, b]])
        return np.where((a == b)[:, None], goal_xy, way)

    def _fine_graph(self):
        """All-pairs BFS (8-connectivity, no corner cutting) on a grid of step_size cells."""
        if self._fine is None:
            r = int(round(1.0 / self.step_size))
            free = np.kron(self.grid == 0, np.ones((r, r), bool))
            h, w = free.shape
            node = -np.ones((h, w), np.int64)
            coords = np.argwhere(free)
            node[free] = np.arange(len(coords))
            n = len(coords)
            nbrs = np.full((n, 8), n, np.int64)  # n = sentinel (never reached)
            moves = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)]
            for k, (di, dj) in enumerate(moves):
                ii, jj = coords[:, 0] + di, coords[:, 1] + dj
                ok = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
                ok[ok] &= free[ii[ok], jj[ok]]
                if di and dj:  # diagonal: both axis-neighbours free
                    ok[ok] &= free[coords[ok, 0] + di, coords[ok, 1]] & free[coords[ok, 0], coords[ok, 1] + dj]
                nbrs[ok, k] = node[ii[ok], jj[ok]]
            dist = np.full((n, n), -1, np.int32)
            frontier = np.eye(n, dtype=bool)
            seen = frontier.copy()
            dist[frontier] = 0
            level = 0
            while frontier.any():
                level += 1
                padded = np.concatenate([frontier, np.zeros((n, 1), bool)], 1)
                new = np.zeros_like(frontier)
                for k in range(8):
                    new |= padded[:, nbrs[:, k]]
                new &= ~seen
                dist[new] = level
                seen |= new
                frontier = new
            self._fine = (r, node, dist)
        return self._fine

    def grid_points(self):
        """Centres [n, 2] of the free BFS grid cells, and their all-pairs step distances [n, n]."""
        r, node, dist = self._fine_graph()
        coords = np.argwhere(node >= 0)
        xy = np.zeros((len(coords), 2))
        xy[node[node >= 0]] = np.stack([coords[:, 1] + 0.5, coords[:, 0] + 0.5], -1) / r
        return xy, dist

    def geodesic(self, a, b):
        """Shortest number of env steps between positions a and b ([..., 2] each), by BFS."""
        r, node, dist = self._fine_graph()
        a, b = np.asarray(a), np.asarray(b)
        na = node[np.floor(a[..., 1] * r).astype(int), np.floor(a[..., 0] * r).astype(int)]
        nb = node[np.floor(b[..., 1] * r).astype(int), np.floor(b[..., 0] * r).astype(int)]
        return dist[na, nb].astype(np.float64)

    # ---------- data ----------
    def collect(self, collector, num_episodes, episode_len, seed, noise=0.5):
        """'diverse': noisy waypoint controller (BFS cell path, P-control, N(0, noise^2) action noise) to
        random goals, a new goal on arrival; 'random': uniform random actions. Starts are uniform."""
        rng = np.random.default_rng(seed)
        xy = self.sample_free(num_episodes, rng, noise=0.45)
        goal = self.sample_free(num_episodes, rng, noise=0.45)
        obs, acts = [xy], []
        for _ in range(episode_len):
            if collector == "diverse":
                way = self.next_waypoint(xy, goal)
                a = np.clip((way - xy) / self.step_size, -1, 1) + noise * rng.standard_normal((num_episodes, 2))
            elif collector == "random":
                a = rng.uniform(-1, 1, size=(num_episodes, 2))
            else:
                raise ValueError(f"unknown collector {collector!r}")
            a = np.clip(a, -1, 1)
            xy = self.step(xy, a)
            obs.append(xy)
            acts.append(a)
            if collector == "diverse":
                arrived = np.linalg.norm(xy - goal, axis=-1) < self.step_size
                goal[arrived] = self.sample_free(int(arrived.sum()), rng, noise=0.45)
        obs, acts = np.stack(obs, 1), np.stack(acts, 1)
        return _stack_trajectories([(obs[e], acts[e]) for e in range(num_episodes)])

    # ---------- evaluation ----------
    def goal_obs(self, goal_xy):
        return np.asarray(goal_xy, np.float32)

    def reset_tasks(self, task_ids, rng):
        """Start and goal positions for each task id, +-0.25 uniform noise as in PointMaze."""
        starts = np.array([self.tasks[t][0] for t in task_ids])
        goals = np.array([self.tasks[t][1] for t in task_ids])
        noise = lambda: rng.uniform(-0.25, 0.25, size=(len(task_ids), 2))
        return self.cell_center(starts) + noise(), self.cell_center(goals) + noise()

    def rollout(self, policy, task_ids, seed, horizon=None, reward_fn=None):
        """Run policy(obs [N, d], goal_obs [N, d]) -> actions [N, 2] on all episodes at once. Returns
        success [N] (||xy - goal|| <= goal_radius at some step, then the episode stops), the xy paths
        [N, T+1, 2] and, if reward_fn(obs, next_obs) is given, its undiscounted return [N]."""
        rng = np.random.default_rng(seed)
        xy, goal = self.reset_tasks(task_ids, rng)
        done = np.zeros(len(task_ids), bool)
        ret = np.zeros(len(task_ids))
        path = [xy.copy()]
        for _ in range(horizon or self.horizon):
            a = np.asarray(policy(xy.astype(np.float32), self.goal_obs(goal)), np.float64)
            nxt = self.step(xy, a)
            if reward_fn is not None:
                ret += reward_fn(xy, nxt)
            else:
                nxt = np.where(done[:, None], xy, nxt)
            xy = nxt
            path.append(xy.copy())
            done |= np.linalg.norm(xy - goal, axis=-1) <= self.goal_radius
        return done, np.stack(path, 1), ret

    def reward_tasks(self, to_grid=None, radius=None):
        """Reward functions r(s, s') for reward prompting, each with the region where a return-maximising
        agent ends up: name -> (r, in_target(obs) -> bool). Directional rewards pay the displacement along
        one axis (east: r = x' - x; south: rows grow downwards, r = y' - y), their target is the extreme free
        column or row; reach_<row>_<col> pays 1 per step within `radius` of that cell's centre (the evaluation
        tasks' goal cells), its target is the cell. `to_grid` maps obs[..., :2] to maze coordinates (PointMaze)."""
        grid = (lambda o: np.asarray(o)[..., :2]) if to_grid is None else (lambda o: to_grid(np.asarray(o)[..., :2]))
        radius = self.goal_radius if radius is None else radius
        free = np.argwhere(self.grid == 0)  # (row, col)
        tasks = {}
        for name, axis, sign in (("east", 0, 1.0), ("west", 0, -1.0), ("south", 1, 1.0), ("north", 1, -1.0)):
            line = free[:, 1 - axis].max() if sign > 0 else free[:, 1 - axis].min()  # extreme column / row
            tasks[name] = (lambda s, s2, a=axis, k=sign: k * (grid(s2)[..., a] - grid(s)[..., a]),
                           lambda o, a=axis, c=line: np.floor(grid(o)[..., a]).astype(np.int64) == c)
        for cell in dict.fromkeys(goal for _, goal in self.tasks):
            c = self.cell_center(cell)
            tasks[f"reach_{cell[0]}_{cell[1]}"] = (
                lambda s, s2, c=c: (np.linalg.norm(grid(s2) - c, axis=-1) <= radius) * 1.0,
                lambda o, cell=cell: np.all(np.stack(self.xy_to_cell(grid(o)), -1) == cell, -1))
        return tasks

    def walls(self):
        """[(x0, y0, w, h)] rectangles of the wall cells, for plotting."""
        return [(j, i, 1.0, 1.0) for i, j in np.argwhere(self.grid == 1)]


def _rank(x):
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(a, b):
    """Spearman rank correlation (average ranks for ties), numpy only."""
    return float(np.corrcoef(_rank(np.asarray(a)), _rank(np.asarray(b)))[0, 1])

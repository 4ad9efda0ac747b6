"""gymnasium-robotics PointMaze (MuJoCo) behind the same interface as `shared.maze.Maze2D`:
`collect`, `rollout`, `goal_obs`, `tasks`, `reward_tasks`, `geodesic`, `walls`, obs_dim/act_dim.

Observation = obs["observation"] = (x, y, vx, vy); the env's desired_goal is not part of the data.
Collection follows D4RL/Minari's PointMaze recipe: continuing_task=True, reset_target=True (a new
random goal on arrival), long episodes, a waypoint controller a = clip(10 (w - xy) - 1 v + N(0, noise^2))
with w the centre of the next cell on a BFS cell path to the current goal. Evaluation uses
continuing_task=False, reset(options={"reset_cell", "goal_cell"}) (+-0.25 position noise), goal
observation (gx, gy, 0, 0) and success = info["success"] (distance <= 0.45) within `horizon` steps.
`load_minari(id)` reads a D4RL/Minari PointMaze dataset the user already has locally into the same
flat layout (needs `pip install minari`; never downloads).
"""

import numpy as np

from shared.maze import Maze2D, _stack_trajectories

ENV_IDS = {"medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3", "umaze": "PointMaze_UMaze-v3"}


def _make(name, continuing):
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    return gym.make(ENV_IDS[name], continuing_task=continuing, reset_target=continuing).unwrapped


class PointMaze:
    def __init__(self, name="medium", horizon=600):
        self.name, self.horizon = name, horizon
        self.grid_maze = Maze2D(name)  # same cell map: BFS paths and geodesic distances
        self.tasks = self.grid_maze.tasks
        self.obs_dim, self.act_dim = 4, 2
        h, w = self.grid_maze.grid.shape
        self.x_center, self.y_center = w / 2, h / 2  # gymnasium-robotics maze_size_scaling = 1

    def to_grid(self, xy):
        """MuJoCo (x, y) -> Maze2D coordinates (column, row)."""
        xy = np.asarray(xy, np.float64)
        return np.stack([xy[..., 0] + self.x_center, self.y_center - xy[..., 1]], -1)

    def from_grid(self, gxy):
        gxy = np.asarray(gxy, np.float64)
        return np.stack([gxy[..., 0] - self.x_center, self.y_center - gxy[..., 1]], -1)

    def geodesic(self, a, b):
        """BFS geodesic distance between xy positions, in Maze2D steps (0.2 cells), velocities ignored."""
        return self.grid_maze.geodesic(self.to_grid(np.asarray(a)[..., :2]), self.to_grid(np.asarray(b)[..., :2]))

    def controller(self, obs, goal_xy, noise, rng):
        way = self.from_grid(self.grid_maze.next_waypoint(self.to_grid(obs[:, :2]), self.to_grid(goal_xy)))
        a = 10.0 * (way - obs[:, :2]) - 1.0 * obs[:, 2:4] + noise * rng.standard_normal((len(obs), 2))
        return np.clip(a, -1.0, 1.0)

    def collect(self, collector, num_episodes, episode_len, seed, noise=0.5):
        """'diverse': waypoint controller to the env's random goals; 'random': uniform actions."""
        rng = np.random.default_rng(seed)
        envs = [_make(self.name, continuing=True) for _ in range(num_episodes)]
        obs = np.stack([e.reset(seed=seed * 100_003 + k)[0]["observation"] for k, e in enumerate(envs)])
        all_obs, all_act = [obs], []
        for _ in range(episode_len):
            if collector == "diverse":
                a = self.controller(obs, np.stack([e.goal for e in envs]), noise, rng)
            elif collector == "random":
                a = rng.uniform(-1, 1, size=(num_episodes, 2))
            else:
                raise ValueError(f"unknown collector {collector!r}")
            obs = np.stack([e.step(a[k])[0]["observation"] for k, e in enumerate(envs)])
            all_obs.append(obs)
            all_act.append(a)
        for e in envs:
            e.close()
        o, a = np.stack(all_obs, 1), np.stack(all_act, 1)
        return _stack_trajectories([(o[k], a[k]) for k in range(num_episodes)])

    def goal_obs(self, goal_xy):
        goal_xy = np.asarray(goal_xy, np.float32)
        return np.concatenate([goal_xy, np.zeros_like(goal_xy)], -1)

    def rollout(self, policy, task_ids, seed, horizon=None, reward_fn=None):
        """Same contract as Maze2D.rollout; xy paths are in MuJoCo coordinates."""
        envs = [_make(self.name, continuing=False) for _ in task_ids]
        obs, goal = [], []
        for k, (e, t) in enumerate(zip(envs, task_ids)):
            start, target = self.tasks[t]
            o, _ = e.reset(seed=seed * 100_003 + k, options={"reset_cell": np.array(start), "goal_cell": np.array(target)})
            obs.append(o["observation"])
            goal.append(e.goal.copy())
        obs, goal = np.stack(obs), np.stack(goal)
        done = np.zeros(len(envs), bool)
        ret = np.zeros(len(envs))
        path = [obs[:, :2].copy()]
        for _ in range(horizon or self.horizon):
            a = np.asarray(policy(obs.astype(np.float32), self.goal_obs(goal)), np.float64)
            nxt = obs.copy()
            for k, e in enumerate(envs):
                if reward_fn is not None or not done[k]:
                    o, _, _, _, info = e.step(a[k])
                    nxt[k] = o["observation"]
                    done[k] |= info["success"]
            if reward_fn is not None:
                ret += reward_fn(obs, nxt)
            obs = nxt
            path.append(obs[:, :2].copy())
        for e in envs:
            e.close()
        return done, np.stack(path, 1), ret

    def reward_tasks(self):
        """Maze2D's reward tasks on the same cell map (north = +y here = towards row 0), success radius 0.45."""
        return self.grid_maze.reward_tasks(to_grid=self.to_grid, radius=0.45)

    def walls(self):
        return [(j - self.x_center, self.y_center - i - 1, 1.0, 1.0) for i, j in np.argwhere(self.grid_maze.grid == 1)]


def load_minari(dataset_id):
    """A locally available Minari dataset (e.g. 'D4RL/pointmaze/medium-v2') -> flat dict. No download."""
    import minari

    ds = minari.load_dataset(dataset_id, download=False)
    trajs = []
    for ep in ds.iterate_episodes():
        obs = ep.observations["observation"] if isinstance(ep.observations, dict) else ep.observations
        trajs.append((np.asarray(obs, np.float32), np.asarray(ep.actions, np.float32)))
    return _stack_trajectories(trajs)

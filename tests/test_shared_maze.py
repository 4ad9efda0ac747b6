"""Tests for the environment plumbing: shared/maze.py (numpy 2D maze) and shared/pointmaze.py (MuJoCo)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.maze import Maze2D, load_dataset, save_dataset, spearman


@pytest.fixture(scope="module")
def medium():
    return Maze2D("medium")


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 5.0))
def test_step_never_enters_walls_and_moves_at_most_step_size(seed, scale):
    maze = Maze2D("medium")
    rng = np.random.default_rng(seed)
    xy = maze.sample_free(256, rng)
    a = rng.normal(scale=scale, size=(256, 2))
    nxt = maze.step(xy, a)
    assert maze.is_free(nxt).all()
    assert (np.abs(nxt - xy) <= maze.step_size + 1e-9).all()
    free_move = maze.is_free(xy + maze.step_size * np.clip(a, -1, 1)) & maze.is_free(xy)
    # far from walls, the move is exactly s + 0.2 clip(a)
    inner = free_move & (np.abs(((xy + 0.5) % 1.0) - 0.5) > 0.25).all(-1)
    np.testing.assert_allclose(nxt[inner], (xy + maze.step_size * np.clip(a, -1, 1))[inner])


def test_wall_blocks_and_slides():
    maze = Maze2D("umaze")  # row 2 is wall except column 3
    xy = np.array([[1.5, 1.9]])  # just above the wall row, in cell (1, 1)
    nxt = maze.step(xy, np.array([[1.0, 1.0]]))
    assert nxt[0, 1] < 2.0 and nxt[0, 0] == pytest.approx(1.7)  # y blocked, x slides


def test_geodesic_distances(medium):
    rng = np.random.default_rng(0)
    a, b, c = (medium.sample_free(500, rng, noise=0.45) for _ in range(3))
    dab, dba = medium.geodesic(a, b), medium.geodesic(b, a)
    np.testing.assert_array_equal(dab, dba)
    assert (medium.geodesic(a, a) == 0).all()
    assert (dab <= medium.geodesic(a, c) + medium.geodesic(c, b)).all()  # triangle inequality
    # a box action moves <= 0.2 per axis, so at least Chebyshev distance / 0.2 steps (minus cell rounding)
    assert (dab >= np.abs(a - b).max(-1) / medium.step_size - 1.0).all()
    u = Maze2D("umaze")  # around the U: 2 cells apart, but the wall forces a detour
    assert u.geodesic(u.cell_center((1, 1)), u.cell_center((3, 1))) == 22
    assert u.geodesic(u.cell_center((1, 1)), u.cell_center((1, 3))) == 10


def test_collectors_layout_and_dynamics(medium, tmp_path):
    for collector in ("diverse", "random"):
        d = medium.collect(collector, 8, 50, seed=1)
        n = 8 * 50
        assert d["observations"].shape == (n, 2) and d["actions"].shape == (n, 2) and d["dones"].sum() == 8
        assert np.nonzero(d["dones"])[0].tolist() == list(range(49, n, 50))
        inside = d["dones"][:-1] == 0
        np.testing.assert_array_equal(d["next_observations"][:-1][inside], d["observations"][1:][inside])
        np.testing.assert_allclose(medium.step(d["observations"], d["actions"]), d["next_observations"], atol=1e-5)
        assert medium.is_free(d["observations"]).all() and (np.abs(d["actions"]) <= 1).all()
    save_dataset(tmp_path / "d.npz", d)
    back = load_dataset(tmp_path / "d.npz")
    for k in d:
        np.testing.assert_array_equal(back[k], d[k])


def test_diverse_data_covers_the_maze(medium):
    d = medium.collect("diverse", 100, 500, seed=0)
    i, j = medium.xy_to_cell(d["observations"])
    visited = {(a, b) for a, b in zip(i, j)}
    assert visited == set(medium.free_cells)


def test_tasks_solvable_by_oracle_not_by_random(medium):
    task_ids = np.repeat(np.arange(5), 10)
    oracle = lambda o, g: np.clip((medium.next_waypoint(o.astype(float), g.astype(float)) - o) / medium.step_size, -1, 1)
    success, path, _ = medium.rollout(oracle, task_ids, seed=0)
    assert success.all() and path.shape == (50, medium.horizon + 1, 2)
    rng = np.random.default_rng(0)
    success, _, _ = medium.rollout(lambda o, g: rng.uniform(-1, 1, (len(o), 2)), task_ids, seed=0)
    assert success.mean() < 0.3


def test_reward_rollout_returns(medium):
    east = medium.reward_tasks()["east"][0]
    _, path, ret = medium.rollout(lambda o, g: np.tile([1.0, 0.0], (len(o), 1)), np.arange(5), seed=0, reward_fn=east)
    np.testing.assert_allclose(ret, path[:, -1, 0] - path[:, 0, 0])  # telescoping x displacement
    assert (ret >= 0).all()


def test_reward_tasks_and_their_target_regions(medium):
    tasks = medium.reward_tasks()
    assert list(tasks)[:4] == ["east", "west", "south", "north"] and len(tasks) == 9  # + the 5 task goal cells
    s, s2 = np.array([[2.5, 3.5]]), np.array([[2.7, 3.4]])
    assert [tasks[k][0](s, s2)[0] for k in ("east", "west", "south", "north")] == pytest.approx([0.2, -0.2, -0.1, 0.1])
    centres = medium.cell_center(np.array(medium.free_cells))
    rows, cols = np.array(medium.free_cells).T
    for name, expect in (("east", cols == 6), ("west", cols == 1), ("south", rows == 6), ("north", rows == 1),
                         ("reach_6_3", (rows == 6) & (cols == 3))):
        np.testing.assert_array_equal(tasks[name][1](centres), expect)
    reach = tasks["reach_6_3"][0]
    c = medium.cell_center((6, 3))
    assert reach(c[None], (c + [0.4, 0.0])[None])[0] == 1.0 and reach(c[None], (c + [0.6, 0.0])[None])[0] == 0.0


def test_spearman():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties get average ranks


@pytest.mark.slow
def test_pointmaze_collect_and_oracle():
    pytest.importorskip("gymnasium_robotics")
    from shared.pointmaze import PointMaze

    pm = PointMaze("medium")
    gxy = np.array([[1.5, 2.5], [6.2, 3.1]])
    np.testing.assert_allclose(pm.to_grid(pm.from_grid(gxy)), gxy)
    d = pm.collect("diverse", 4, 300, seed=0)
    assert d["observations"].shape == (1200, 4) and d["dones"].sum() == 4
    inside = d["dones"][:-1] == 0
    np.testing.assert_array_equal(d["next_observations"][:-1][inside], d["observations"][1:][inside])
    assert pm.grid_maze.is_free(pm.to_grid(d["observations"][:, :2])).all()
    rng = np.random.default_rng(0)
    oracle = lambda o, g: pm.controller(o.astype(float), g[:, :2].astype(float), 0.0, rng)
    success, path, _ = pm.rollout(oracle, np.arange(5), seed=0)
    assert success.all() and path.shape == (5, pm.horizon + 1, 2)
    success, _, _ = pm.rollout(lambda o, g: rng.uniform(-1, 1, (len(o), 2)), np.arange(5), seed=0)
    assert success.mean() < 0.5
    tasks = pm.reward_tasks()  # north is +y in MuJoCo coordinates, towards row 1 of the map
    o = np.array([[0.0, 0.0, 0.0, 0.0]])
    assert tasks["north"][0](o, o + [0.0, 0.1, 0.0, 0.0])[0] == pytest.approx(0.1)
    assert tasks["north"][1](pm.from_grid(pm.grid_maze.cell_center((1, 1)))) and not tasks["south"][1](o[0, :2])

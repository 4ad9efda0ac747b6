"""Tests for algos/hilp.py: the spec's §8 checks (hilp.md) with hand-computed numbers, a short phi training
on the 2D maze against BFS distances, and subprocess smoke runs with resume."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared.maze import Maze2D, spearman

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hilp", ROOT / "algos" / "hilp.py")
hilp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hilp)

torch.set_num_threads(1)


def small_args(**kw):
    base = dict(hidden_dim=32, num_layers=2, latent_dim=8, batch_size=64)
    base.update(kw)
    return hilp.Args(**base)


# ---- §8.1 expectile loss
def test_expectile_loss_values():
    adv = torch.tensor([1.0, -1.0, 0.0])
    diff = torch.tensor([2.0, 3.0, -1.0])
    out = hilp.expectile_loss(adv, diff, 0.9)
    torch.testing.assert_close(out, torch.tensor([0.9 * 4, 0.1 * 9, 0.9 * 1]))  # adv >= 0 -> tau
    u = torch.randn(100)
    torch.testing.assert_close(hilp.expectile_loss(u, u, 0.5).mean(), 0.5 * (u**2).mean())


def test_phi_value_loss_hand_computed():
    # gamma=0.5, tau=0.9, r=-1, m=1; Vbar(s')=(-2,-4) -> q=-1+0.5*min=-3; Vbar(s)=(-3,-1) -> adv=-3-(-2)=-1 < 0
    # q_i = (-2, -3), V = (-1, -5): diffs (-1, 2), both weighted 1-tau=0.1 -> 0.1*1 + 0.1*4 = 0.5
    v = torch.tensor([[-1.0], [-5.0]])
    loss, _ = hilp.phi_value_loss(v, torch.tensor([[-3.0], [-1.0]]), torch.tensor([[-2.0], [-4.0]]),
                                  torch.tensor([-1.0]), torch.tensor([1.0]), 0.5, 0.9)
    assert loss.item() == pytest.approx(0.5)  # weighting by q_i - V_i instead would give 0.1 + 3.6 = 3.7
    # at the goal (r = 0, m = 0) the target is 0 whatever Vbar(s') is; adv = 0 - 0 >= 0 -> weight tau
    loss0, _ = hilp.phi_value_loss(torch.tensor([[-2.0], [-2.0]]), torch.tensor([[0.0], [0.0]]),
                                   torch.tensor([[-9.0], [-9.0]]), torch.tensor([0.0]), torch.tensor([0.0]), 0.5, 0.9)
    assert loss0.item() == pytest.approx(2 * 0.9 * 4)


# ---- §8.2 value form
def test_hilbert_value_properties_and_grad_at_goal():
    phi = hilp.Ensemble(2, 32, 2, 8)
    s = torch.randn(16, 2, requires_grad=True)
    g = torch.randn(16, 2)
    v_ss = hilp.hilbert_value(phi(s), phi(s))
    torch.testing.assert_close(v_ss, torch.full_like(v_ss, -1e-3))  # -sqrt(1e-6)
    v_sg, v_gs = hilp.hilbert_value(phi(s), phi(g)), hilp.hilbert_value(phi(g), phi(s))
    torch.testing.assert_close(v_sg, v_gs)
    assert (v_sg <= 0).all()
    v_ss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in phi.parameters()) and torch.isfinite(s.grad).all()


# ---- §8.3 goal sampler
def _dones(num_traj, length):
    d = np.zeros(num_traj * length, np.float32)
    d[length - 1 :: length] = 1
    return d


def test_goal_sampler_statistics():
    L, gamma = 2000, 0.99
    traj_end = hilp.trajectory_ends(_dones(100, L))
    rng = np.random.default_rng(0)
    # trajectory goals only, from starts far from the end: offset ~ Geometric(1-gamma), mean 1/(1-gamma)
    idx = rng.integers(0, 500, size=200_000) + L * rng.integers(0, 100, size=200_000)
    goal, reward, mask = hilp.sample_goals(idx, traj_end, rng, gamma, p_trajgoal=1.0)
    off = goal - idx
    assert (off >= 1).all() and (goal <= traj_end[idx]).all()
    assert off.mean() == pytest.approx(1 / (1 - gamma), rel=0.03)
    assert (reward == -1).all() and (mask == 1).all()
    # the mix: random goals ~0.375 (a random goal lands in the same trajectory's future ~1/200 of the time)
    idx = rng.integers(len(traj_end), size=200_000)
    goal, reward, mask = hilp.sample_goals(idx, traj_end, rng, gamma, p_trajgoal=0.625)
    same_future = (goal >= idx) & (goal <= traj_end[idx])
    assert (1 - same_future.mean()) == pytest.approx(0.375 * (1 - 1 / 200), abs=0.006)
    # r = 0 and m = 0 exactly when the goal index is t: the last state of a trajectory relabelled to itself
    ends = np.nonzero(_dones(100, L))[0]
    goal, reward, mask = hilp.sample_goals(ends, traj_end, rng, gamma, p_trajgoal=1.0)
    assert (goal == ends).all() and (reward == 0).all() and (mask == 0).all()
    idx = rng.integers(len(traj_end), size=50_000)
    goal, reward, mask = hilp.sample_goals(idx, traj_end, rng, gamma, p_trajgoal=0.625)
    np.testing.assert_array_equal(reward == 0, goal == idx)
    np.testing.assert_array_equal(mask == 0, goal == idx)


# ---- §8.4 phi orders states like the BFS distance on the maze (short training)
def _train_phi(expectile, steps=1500, seed=1):
    torch.manual_seed(seed)
    maze = Maze2D("umaze")
    data = maze.collect("random", 200, 200, seed)
    traj_end, rng = hilp.trajectory_ends(data["dones"]), np.random.default_rng(seed)
    obs, nxt = torch.as_tensor(data["observations"]), torch.as_tensor(data["next_observations"])
    phi, phi_t = hilp.Ensemble(2, 64, 2, 32), hilp.Ensemble(2, 64, 2, 32)
    phi_t.load_state_dict(phi.state_dict())
    opt = torch.optim.Adam(phi.parameters(), lr=1e-3)  # short-budget settings: lr 1e-3, Polyak 0.02
    for _ in range(steps):
        idx = rng.integers(len(traj_end), size=256)
        goal, r, m = hilp.sample_goals(idx, traj_end, rng, 0.99, 0.625)
        s, s2, g = obs[idx], nxt[idx], obs[goal]
        v = hilp.hilbert_value(phi(s), phi(g))
        with torch.no_grad():
            tg = phi_t(g)
            v_t, nv_t = hilp.hilbert_value(phi_t(s), tg), hilp.hilbert_value(phi_t(s2), tg)
        loss, _ = hilp.phi_value_loss(v, v_t, nv_t, torch.as_tensor(r), torch.as_tensor(m), 0.99, expectile)
        opt.zero_grad()
        loss.backward()
        hilp.polyak(phi_t, phi, 0.02)
        opt.step()
    prng = np.random.default_rng(123)
    a, b = maze.sample_free(2000, prng, noise=0.45), maze.sample_free(2000, prng, noise=0.45)
    with torch.no_grad():
        dphi = (phi.nets[0](torch.as_tensor(a, dtype=torch.float32)) - phi.nets[0](torch.as_tensor(b, dtype=torch.float32))).norm(dim=-1).numpy()
    return maze, a, b, dphi


@pytest.mark.slow
def test_phi_distance_matches_bfs_distance_on_maze():
    maze, a, b, dphi = _train_phi(0.95)
    d = maze.geodesic(a, b)
    rho = spearman(dphi, d)
    rho_euclid = spearman(np.linalg.norm(a - b, axis=-1), d)  # ~0.92: walls make the difference
    assert rho >= 0.9 and rho > rho_euclid
    # -V should be a monotone fit of (1 - gamma^d) / (1 - gamma)
    assert np.corrcoef(dphi, (1 - 0.99**d) / (1 - 0.99))[0, 1] >= 0.85
    # tau = 0.5 fits the random walk's own (much longer, noisier) hitting times instead
    _, a5, b5, dphi5 = _train_phi(0.5, steps=1000)
    assert spearman(dphi5, maze.geodesic(a5, b5)) < rho - 0.15


# ---- §8.5 telescoping intrinsic reward
def test_intrinsic_reward_telescopes():
    torch.manual_seed(0)
    agent = hilp.HILP(2, 2, small_args())
    data = Maze2D("medium").collect("diverse", 1, 100, seed=0)
    s, s2 = torch.as_tensor(data["observations"]), torch.as_tensor(data["next_observations"])
    z = hilp.sample_skills(1, 8).expand(len(s), -1)
    total = hilp.intrinsic_reward(agent.embed(s), agent.embed(s2), z).sum()
    expected = ((agent.embed(s2[-1:]) - agent.embed(s[:1])) * z[:1]).sum()
    torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-4)


# ---- §8.6 each loss reaches only its own module; target nets; Polyak
def _batch(agent_args, seed=0):
    maze = Maze2D("umaze")
    data = maze.collect("diverse", 10, 50, seed)
    tensors = {k: torch.as_tensor(data[k]) for k in ("observations", "actions", "next_observations")}
    return hilp.sample_batch(data, tensors, hilp.trajectory_ends(data["dones"]), np.random.default_rng(seed), agent_args)


def test_each_loss_updates_only_its_module():
    torch.manual_seed(0)
    args = small_args()
    agent = hilp.HILP(2, 2, args)
    batch = _batch(args)
    z = hilp.sample_skills(args.batch_size, args.latent_dim)
    owners = {"phi": agent.phi, "value": agent.value, "critic": agent.critic, "actor": agent.actor}
    for name in owners:
        terms, _ = hilp.losses(agent, batch, z, args)
        agent.zero_grad(set_to_none=True)
        terms[name].backward()
        for other, module in owners.items():
            has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
            assert has_grad == (other == name), (name, other)
        assert all(p.grad is None for p in [*agent.phi_target.parameters(), *agent.critic_target.parameters()])


def test_update_polyak_and_phi_untouched_by_policy_terms():
    torch.manual_seed(0)
    args = small_args(target_update_rate=0.1)
    agent = hilp.HILP(2, 2, args)
    opt = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    batch = _batch(args)
    hilp.update(agent, opt, batch, args)  # one step so online != target
    online = {k: v.clone() for k, v in agent.phi.state_dict().items()}
    target = {k: v.clone() for k, v in agent.phi_target.state_dict().items()}
    hilp.update(agent, opt, batch, args)
    for k in target:  # target <- (1 - rho) target + rho online (online before this step's Adam update)
        torch.testing.assert_close(agent.phi_target.state_dict()[k], 0.9 * target[k] + 0.1 * online[k])
    # the phi update equals the update from L_phi alone (policy terms add no gradient to phi)
    torch.manual_seed(1)
    a1 = hilp.HILP(2, 2, args)
    a2 = hilp.HILP(2, 2, args)
    a2.load_state_dict(a1.state_dict())
    z = hilp.sample_skills(args.batch_size, args.latent_dim)
    t1, _ = hilp.losses(a1, batch, z, args)
    sum(t1.values()).backward()
    t2, _ = hilp.losses(a2, batch, z, args)
    t2["phi"].backward()
    for p1, p2 in zip(a1.phi.parameters(), a2.phi.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad)


# ---- §8.7 skills
def test_skills_unit_norm_isotropic_and_resampled(monkeypatch):
    z = hilp.sample_skills(20_000, 32)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(20_000))
    assert z.mean(0).abs().max() < 0.02  # direction mean ~ 0
    seen = []
    orig = hilp.sample_skills
    monkeypatch.setattr(hilp, "sample_skills", lambda *a, **k: seen.append(orig(*a, **k)) or seen[-1])
    args = small_args()
    agent = hilp.HILP(2, 2, args)
    opt = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
    batch = _batch(args)
    hilp.update(agent, opt, batch, args)
    hilp.update(agent, opt, batch, args)
    assert len(seen) == 2 and seen[0].shape == (args.batch_size, args.latent_dim)
    assert not torch.allclose(seen[0], seen[1])
    assert len({tuple(r) for r in seen[0].numpy().round(6)}) == args.batch_size  # one z per sample


# ---- §8.8 reward prompting recovers a planted z
def test_reward_prompt_recovers_planted_z():
    g = torch.Generator().manual_seed(0)
    phitil = torch.randn(10_000, 32, generator=g)
    z_true = torch.randn(32, generator=g)
    z_true = z_true / z_true.norm()
    reward = 3.0 * phitil @ z_true + 0.1 * torch.randn(10_000, generator=g)
    z_hat = hilp.reward_prompt(phitil, reward)
    assert z_hat.norm().item() == pytest.approx(1.0)
    assert (z_hat @ z_true).item() > 0.99


def test_goal_prompt_is_unit_direction():
    phi_s, phi_g = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(hilp.goal_prompt(phi_s, phi_g), torch.tensor([[0.6, 0.8]]))


# ---- §8.9 planning: the waypoint lies between s and g
def test_planning_waypoint_in_empty_room():
    xs = torch.linspace(0, 10, 101)
    states = torch.cartesian_prod(xs, xs)  # phi = identity on an empty room
    s, g = torch.tensor([[1.0, 1.0]]), torch.tensor([[9.0, 9.0]])
    w = hilp.plan_waypoint(s, g, states, num_knns=50, num_recursions=1)
    torch.testing.assert_close(w, torch.tensor([[5.0, 5.0]]), atol=0.15, rtol=0)
    half = (g - s).norm() / 2
    assert max((w - s).norm(), (w - g).norm()) == pytest.approx(half.item(), rel=0.05)
    w3 = hilp.plan_waypoint(s, g, states, num_knns=50, num_recursions=3)  # midpoint of midpoint of midpoint
    torch.testing.assert_close(w3, s + (g - s) / 8, atol=0.15, rtol=0)


def test_planning_routes_around_walls():
    # phi = classical MDS of the BFS distances of the U-maze grid, a near distance-preserving embedding
    maze = Maze2D("umaze")
    xy, dist = maze.grid_points()
    n = len(xy)
    j = np.eye(n) - 1.0 / n
    w, vec = np.linalg.eigh(-0.5 * j @ (dist.astype(float) ** 2) @ j)
    top = np.argsort(w)[::-1][:16]
    phi = torch.tensor(vec[:, top] * np.sqrt(np.maximum(w[top], 0)), dtype=torch.float32)
    s, g = maze.cell_center((1, 1)), maze.cell_center((3, 1))  # two cells apart, wall in between
    i_s, i_g = np.linalg.norm(xy - s, axis=1).argmin(), np.linalg.norm(xy - g, axis=1).argmin()
    way = hilp.plan_waypoint(phi[i_s : i_s + 1], phi[i_g : i_g + 1], phi, num_knns=5, num_recursions=1)
    k = torch.cdist(way, phi).argmin().item()
    assert maze.xy_to_cell(xy[k]) == (2, 3)  # the far side of the U, not the straight-line midpoint (a wall)
    assert maze.geodesic(xy[k], s) == pytest.approx(maze.geodesic(s, g) / 2, abs=1)


# ---- smoke runs and resume
def _run(*extra, out):
    cmd = [sys.executable, str(ROOT / "algos" / "hilp.py"), "--env", "maze2d-umaze", "--dataset-episodes", "20",
           "--dataset-episode-len", "100", "--hidden-dim", "32", "--num-layers", "2", "--latent-dim", "8",
           "--batch-size", "32", "--eval-every", "1000", "--eval-episodes", "2", "--log-every", "10",
           "--checkpoint-every", "1000", "--planning-num-states", "500", "--reward-prompt-samples", "500",
           "--output-dir", str(out), "--data-dir", str(out / "data"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _metrics(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_smoke_run_and_resume_continues_exactly(tmp_path):
    _run("--total-steps", "40", "--seed", "3", out=tmp_path / "a")
    (run_a,) = [p for p in (tmp_path / "a").iterdir() if p.name.startswith("hilp__")]
    m = _metrics(run_a)
    assert [r["step"] for r in m if "train/loss" in r] == [10, 20, 30, 40]
    final = [r for r in m if "eval/success" in r][-1]
    assert final["step"] == 40 and 0.0 <= final["eval/success"] <= 1.0 and "eval/success_plan" in final
    assert "eval/reward_return/east" in final and np.isfinite(final["eval/phi_spearman"])
    assert json.load(open(run_a / "args.json"))["total_steps"] == 40
    state_a = torch.load(run_a / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state_a["step"] == 40

    _run("--total-steps", "20", "--seed", "3", out=tmp_path / "b")
    (run_b,) = [p for p in (tmp_path / "b").iterdir() if p.name.startswith("hilp__")]
    _run("--resume", str(run_b), "--total-steps", "40", out=tmp_path / "b")
    state_b = torch.load(run_b / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state_b["step"] == 40
    for k, v in state_a["model"].items():  # 20 + 20 steps == 40 steps, bit for bit
        torch.testing.assert_close(state_b["model"][k], v, rtol=0, atol=0)
    train_b = [r for r in _metrics(run_b) if "train/loss" in r]
    assert [r["step"] for r in train_b] == [10, 20, 30, 40]
    train_a = [r for r in m if "train/loss" in r]
    assert [r["train/loss"] for r in train_b] == [r["train/loss"] for r in train_a]

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
from tests.helpers import read_metrics

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


# ---- the value target and the intrinsic reward, through losses() (planted-bug checks)
def _linear_phi_agent(scales_online, scales_target, **kw):
    """A HILP agent on 2-D states whose phi nets are phi_i(x) = scale_i * x (online and target)."""
    args = small_args(latent_dim=2, **kw)
    agent = hilp.HILP(2, 2, args)
    for ens, scales in ((agent.phi, scales_online), (agent.phi_target, scales_target)):
        ens.nets = torch.nn.ModuleList([torch.nn.Linear(2, 2, bias=False) for _ in scales])
        with torch.no_grad():
            for net, c in zip(ens.nets, scales):
                net.weight.copy_(c * torch.eye(2))
    return agent, args


def _hand_batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, g_ = torch.rand(n, 2, generator=g) * 6, torch.rand(n, 2, generator=g) * 6
    s2 = s + 0.4 * (torch.rand(n, 2, generator=g) - 0.5)
    mask = (torch.rand(n, generator=g) < 0.8).float()
    return {"obs": s, "act": torch.rand(n, 2, generator=g) * 2 - 1, "next_obs": s2, "goal": g_,
            "reward": mask - 1.0, "mask": mask}


def test_phi_loss_through_losses_bootstraps_from_the_min_of_the_two_target_nets():
    """E4 through `losses()` with linear phi nets: the expectile weight comes from
    r + gamma m min_i Vbar_i(s', g) - mean_i Vbar_i(s, g); the mean of the two would weight other samples."""
    agent, args = _linear_phi_agent((1.0, 2.0), (1.0, 3.0), expectile=0.9)
    b = _hand_batch()
    dist = lambda c, x, y: torch.sqrt(torch.clamp(((c * x - c * y) ** 2).sum(-1), min=1e-6))
    v = torch.stack([-dist(c, b["obs"], b["goal"]) for c in (1.0, 2.0)])
    vt = torch.stack([-dist(c, b["obs"], b["goal"]) for c in (1.0, 3.0)])
    nvt = torch.stack([-dist(c, b["next_obs"], b["goal"]) for c in (1.0, 3.0)])

    def expected(reduce):
        adv = b["reward"] + args.discount * b["mask"] * reduce(nvt) - vt.mean(0)
        w = torch.where(adv >= 0, 0.9, 0.1)
        return (w * (b["reward"] + args.discount * b["mask"] * nvt - v) ** 2).mean(-1).sum()

    terms, _ = hilp.losses(agent, b, hilp.sample_skills(len(b["obs"]), 2), args)
    with_min, with_mean = expected(lambda t: t.min(0).values), expected(lambda t: t.mean(0))
    assert abs(with_min - with_mean) > 0.05 * with_min  # the test can tell the two apart
    torch.testing.assert_close(terms["phi"], with_min)


def test_losses_use_the_intrinsic_reward_phi_next_minus_phi_s():
    """E5-E6 through `losses()`: r_z = (phi_1(s') - phi_1(s))^T z in the logged reward and in the critic target."""
    agent, args = _linear_phi_agent((1.0, 2.0), (1.0, 3.0))
    b = _hand_batch()
    b["next_obs"] = b["next_obs"] + 0.2  # a drift south-east, and one z along it: E[r_z] is clearly positive
    z = torch.full((len(b["obs"]), 2), 2 ** -0.5)
    terms, info = hilp.losses(agent, b, z, args)
    r_z = ((b["next_obs"] - b["obs"]) * z).sum(-1)  # phi_1 = identity
    assert r_z.mean() > 0.2 and info["hilp/intrinsic_reward"] == pytest.approx(r_z.mean().item(), abs=1e-6)
    with torch.no_grad():
        next_v = agent.value(torch.cat([b["next_obs"], z], -1)).squeeze(-1)
        q = agent.critic(torch.cat([b["obs"], z, b["act"]], -1)).squeeze(-1)
    torch.testing.assert_close(terms["critic"], ((r_z + args.skill_discount * next_v - q) ** 2).mean(-1).sum())


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
    z_hat, w = hilp.reward_prompt(phitil, reward)
    assert z_hat.norm().item() == pytest.approx(1.0) and w.norm().item() == pytest.approx(3.0, rel=0.01)
    assert (z_hat @ z_true).item() > 0.99
    z_ridge, _ = hilp.reward_prompt(phitil, reward, ridge=0.1)  # isotropic features: ridge only shrinks w
    assert (z_ridge @ z_true).item() > 0.99


def test_whitened_skills_are_reward_prompts_for_one_transition_rewards():
    """E5 option: row j of whitened_skills(X) is E7's z for the reward 1[i = j] (any ridge)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) @ torch.diag(torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 0.01]))
    for ridge in (0.0, 0.01):
        z = hilp.whitened_skills(x, ridge)
        for j in (0, 17, 299):
            torch.testing.assert_close(z[j], hilp.reward_prompt(x, torch.eye(300)[j], ridge)[0], atol=1e-5, rtol=0)
    assert hilp.prompt_features(x[:, :2], x[:, 2:4], "diff").equal(x[:, 2:4] - x[:, :2])
    nxt = hilp.prompt_features(x[:, :2], x[:, 2:4], "next")  # centred: [phi(s'), 1] with the constant projected out
    torch.testing.assert_close(nxt.mean(0), torch.zeros(2), atol=1e-5, rtol=0)


def test_update_mixes_whitened_skills_into_the_batch(monkeypatch):
    """--skill-mix-ratio 1: every z of the update is a whitened feature of the batch (E5 option); 0: none is."""
    torch.manual_seed(0)
    for ratio, feature in ((1.0, "next"), (0.0, "diff")):
        args = small_args(skill_mix_ratio=ratio, reward_prompt_feature=feature)
        agent = hilp.HILP(2, 2, args)
        opt = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)
        batch, seen = _batch(args), []
        orig = hilp.losses
        monkeypatch.setattr(hilp, "losses", lambda ag, b, z, a: seen.append(z) or orig(ag, b, z, a))
        whitened = hilp.whitened_skills(hilp.prompt_features(agent.embed(batch["obs"]), agent.embed(batch["next_obs"]),
                                                             feature), 0.0)
        hilp.update(agent, opt, batch, args)
        monkeypatch.undo()
        match = (seen[0][:, None] - whitened[None]).abs().amax(-1).min(1).values < 1e-5  # z_i is some row of it
        assert match.all() if ratio == 1.0 else not match.any()
        torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(len(seen[0])))


def test_reward_prompting_recovers_a_planted_goal_direction():
    """Through the evaluation's reward_prompting: with r = (phi(s') - phi(s))^T z_goal on the dataset, the
    regression gives back z_goal (cosine > 0.95), also with a small ridge, and R^2 ~ 1."""
    torch.manual_seed(0)
    args = small_args(reward_prompt_samples=3000, eval_episodes=1)
    agent = hilp.HILP(2, 2, args)
    maze = Maze2D("medium")
    data = maze.collect("diverse", 30, 200, seed=0)
    embed = lambda o: agent.embed(torch.as_tensor(o, dtype=torch.float32))
    z_goal = hilp.goal_prompt(embed(maze.cell_center((1, 1))[None]), embed(maze.cell_center((6, 6))[None]))[0]
    reward = lambda s, s2: ((embed(s2) - embed(s)) @ z_goal).numpy()
    maze.reward_tasks = lambda: {"planted": (reward, lambda o: np.zeros(np.shape(o)[:-1], bool))}
    for ridge in (0.0, 1e-3):
        args.reward_prompt_ridge = ridge
        out, details = hilp.reward_prompting(agent, maze, data, args, np.random.default_rng(0))
        cos = torch.tensor(details["planted"]["z"]) @ z_goal
        assert cos > 0.95 and details["planted"]["r2"] > 0.95, (ridge, cos)
    assert len(details["singular_values"]) == args.latent_dim and "eval/reward_prompt_cond" in out


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


# ---- end to end: goal reaching on the small 2D maze, well above the random policy
@pytest.mark.slow
def test_goal_reaching_on_the_umaze_is_well_above_random(tmp_path):
    torch.manual_seed(0)
    args = small_args(env="maze2d-umaze", dataset_episodes=100, dataset_episode_len=200, data_dir=str(tmp_path / "data"),
                      output_dir=str(tmp_path), total_steps=5000, eval_every=5000, checkpoint_every=5000, log_every=500,
                      eval_episodes=20, hidden_dim=64, latent_dim=16, batch_size=256, planning=False,
                      reward_prompt_samples=2000)
    res = hilp.main(args)
    env = res["env"]
    task_ids = np.repeat(np.arange(len(env.tasks)), args.eval_episodes)
    rng = np.random.default_rng(0)
    random_success, _, _ = env.rollout(lambda o, g: rng.uniform(-1, 1, (len(o), 2)), task_ids, seed=args.seed)
    assert res["eval/success"] >= random_success.mean() + 0.4, (res["eval/success"], random_success.mean())


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


@pytest.mark.slow
def test_smoke_run_and_resume_continues_exactly(tmp_path):
    _run("--total-steps", "40", "--seed", "3", out=tmp_path / "a")
    (run_a,) = [p for p in (tmp_path / "a").iterdir() if p.name.startswith("hilp__")]
    m = read_metrics(run_a)
    assert [r["step"] for r in m if "train/loss" in r] == [10, 20, 30, 40]
    final = [r for r in m if "eval/success" in r][-1]
    assert final["step"] == 40 and 0.0 <= final["eval/success"] <= 1.0 and "eval/success_plan" in final
    assert "eval/reward_return/east" in final and "eval/reward_success/reach_1_3" in final
    assert np.isfinite(final["eval/phi_spearman"]) and np.isfinite(final["eval/reward_r2/east"])
    prompting = json.load(open(run_a / "reward_prompting.json"))
    assert prompting["step"] == 40 and len(prompting["singular_values"]) == 8 and "argmax_state" in prompting["east"]
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
    train_b = [r for r in read_metrics(run_b) if "train/loss" in r]
    assert [r["step"] for r in train_b] == [10, 20, 30, 40]
    train_a = [r for r in m if "train/loss" in r]
    assert [r["train/loss"] for r in train_b] == [r["train/loss"] for r in train_a]

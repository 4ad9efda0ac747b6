"""HILP: Foundation Policies with Hilbert Representations (Park, Kreiman, Levine, ICML 2024), arXiv:2402.15567.

Idea. From reward-free offline trajectories, learn phi: S -> R^D whose Euclidean distances are temporal
distances (the number of steps between states), by forcing the goal-conditioned value into the form
V(s, g) = -||phi(s) - phi(g)|| and fitting it with an IQL-style expectile TD loss on hindsight-relabelled goals.
Then train one latent-conditioned policy pi(a | s, z), z a unit direction, with offline RL (IQL + AWR) on
the intrinsic reward <phi(s') - phi(s), z>: "move as far as possible along z in latent space". At test
time z is picked without training: z = normalize(phi(g) - phi(s)) to reach g, a least-squares fit for any
reward, or a latent midpoint found by planning.

Equations (labels E1-E8 are ours; the paper's own equation numbers could not be checked offline, so
each is tied to the spec `shared/papers/hilp.md` section and to the official code, seohongpark/HILP):
  E1 (spec §2) V(s, g) = -||phi(s) - phi(g)||, coded as -sqrt(max(||.||^2, 1e-6)), two phi nets.
  E2 (spec §2) goals: g = s_{t+k}, k ~ Geom(1 - gamma), capped at the trajectory end (p = 0.625), or a
     uniform dataset state (p = 0.375); c = 1[idx(g) == t], r = c - 1, m = 1 - c.
  E3 (spec §2) l_tau(u) = |tau - 1[u < 0]| u^2, the expectile loss.
  E4 (spec §2) q_i = r + gamma m Vbar_i(s', g); adv = r + gamma m min_i Vbar_i(s', g) - mean_i Vbar_i(s, g);
     L_phi = sum_i mean(|tau - 1[adv < 0]| (q_i - V_i(s, g))^2), tau = 0.95, gamma = 0.99.
  E5 (spec §2) r_z(s, s') = <phi(s') - phi(s), z>, z ~ Uniform(unit sphere), phi = phi_1, frozen. Option (ZSRL
     code): a share of z = normalize((X^T X + lambda I)^+ x_j), E7's answer for a reward that is 1 at one
     batch transition j ("whitened features"), so that the policy also sees z shaped like E7's outputs.
  E6 (spec §2) IQL + AWR on r_z:  L_V = mean l_{0.9}(min_i Qbar_i(s,a,z) - V(s,z));
     L_Q = sum_i mean(r_z + gamma_s V(s',z) - Q_i(s,a,z))^2 (no terminal mask);
     L_pi = -mean(min(exp(beta (min_i Qbar_i - V)), 100) log pi(a|s,z)), beta = 10.
  E7 (spec §2) prompting: goal z = (phi(g) - phi(s)) / ||.||, recomputed every step; reward
     z = normalize(w), w = argmin_w sum_i (r_i - x_i^T w)^2 + lambda ||w||^2 with x = phi(s') - phi(s) (paper
     form) or x = [phi(s'), 1] for rewards of the next state only (ZSRL code: centred phi(s')). The policy of
     E5-E6 serves both: sum_t gamma^t (phi(s_t+1) - phi(s_t))^T z = (1 - gamma) sum_t gamma^t phi(s_t+1)^T z
     - phi(s_0)^T z, so it is also optimal for the state reward phi(s')^T z.
  E8 (spec §2) planning: w = argmin_{w in D} max(||phi(s) - phi(w)||, ||phi(w) - phi(g)||); as in the code,
     average phi of the 50 best of N dataset states, use it as the new goal, repeat 3 times.

What this file simplifies or changes: the D4RL/ExORL datasets are replaced by self-collected data on
a numpy 2D maze and on gymnasium-robotics PointMaze (`shared/maze.py`, `shared/pointmaze.py`). The
policy learner is the goal-conditioned code's IQL/AWR (not the ZSRL code's successor features + TD3).
z is drawn fresh for every sample at every step (the paper's JAX runs reused one fixed batch of z, spec
§7). Networks use PyTorch's default initialisation, not the JAX code's. Evaluation: 5 fixed start/goal
tasks per maze; reward prompting is scored on the maze's reward tasks (4 directions, 5 cells to reach) from
every distinct task start, with diagnostics (R^2 of the fit, singular values, the state maximising
phi^T z). The whitened z of E5 and E7's [phi(s'), 1] are options from the ZSRL code, E7's ridge term is
ours (the code's least squares can put z on directions along which phi barely moves); all off by default. Defaults are
the paper's (3x512 nets, batch 1024, 1M steps); the CPU budget of scripts/hilp_benchmark.py is
  python algos/hilp.py --env maze2d-medium --total-steps 10000 --batch-size 256 --hidden-dim 128 --num-layers 2 \
      --eval-every 10000 --planning-num-states 5000
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702

import json
import os
import signal
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn as nn
import tqdm

from shared.args import cli, require
from shared.maze import MAZES, Maze2D, load_dataset, save_dataset, spearman
from shared.run import check_resume_dir, make_run_dir, save_args


@dataclass
class Args:
    # ---- experiment ----
    env: str = "maze2d-medium"
    """maze2d-{umaze,medium,large} (numpy, shared/maze.py) or pointmaze-{umaze,medium,large} (MuJoCo PointMaze)"""
    dataset: str = "diverse"
    """offline data D: 'diverse' (noisy waypoint controller) or 'random' (random walk), collected once and cached
    in data_dir; or a .npz path (keys observations/actions/next_observations/dones); or 'minari:<local id>'"""
    dataset_episodes: int = 500
    """number of collected trajectories (spec §5: ~500 x 500 on the 2D maze)"""
    dataset_episode_len: int = 500
    """steps per collected trajectory"""
    data_dir: str = "runs/data"
    """where collected datasets are cached as .npz"""
    seed: int = 1
    """seed of the run (dataset collection uses it too)"""
    output_dir: str = "runs"
    """runs land in {output_dir}/hilp__{env}__{seed}__{time}/"""
    resume: str | None = None
    """a run directory: continue from its checkpoint/trainer_state.pt at the same step"""
    track: bool = False
    """also write TensorBoard logs to the run directory"""
    total_steps: int = 1_000_000
    """gradient steps (paper: 1M)"""
    eval_every: int = 100_000
    """evaluate goal reaching every this many steps (paper: 100k) and at the end"""
    checkpoint_every: int = 10_000
    """write checkpoint/trainer_state.pt every this many steps (and at the end / on Ctrl-C)"""
    log_every: int = 1_000
    """write training metrics every this many steps"""
    eval_episodes: int = 50
    """episodes per evaluation task (spec §5: 5 tasks x 50 episodes)"""
    planning: bool = True
    """also evaluate HILP-Plan (E8)"""
    device: str = "cpu"
    """torch device"""
    # ---- algorithm ----
    latent_dim: int = 32
    """D, dimension of the Hilbert space (paper GCRL: 32)"""
    hidden_dim: int = 512
    """width of every MLP (paper: 512)"""
    num_layers: int = 3
    """hidden layers of every MLP (paper: 3)"""
    lr: float = 3e-4
    """Adam learning rate for all modules (paper: 3e-4)"""
    batch_size: int = 1024
    """transitions per gradient step (paper: 1024)"""
    discount: float = 0.99
    """gamma in E2/E4 for phi and the geometric goal offset (paper: 0.99)"""
    expectile: float = 0.95
    """tau in E3/E4 for the phi value (paper GCRL: 0.95)"""
    p_trajgoal: float = 0.625
    """probability of a future goal from the same trajectory (E2)"""
    p_randomgoal: float = 0.375
    """probability of a uniform dataset goal (E2); p_curgoal = 0"""
    target_update_rate: float = 0.005
    """Polyak rate of the target phi pair and target Q pair"""
    skill_expectile: float = 0.9
    """tau_s in E6, IQL expectile of the skill value"""
    skill_discount: float = 0.99
    """gamma_s in E6"""
    temperature: float = 10.0
    """beta in E6, AWR inverse temperature"""
    adv_clip: float = 100.0
    """clip of exp(beta * adv) in E6"""
    planning_num_states: int = 50_000
    """N dataset states searched for the midpoint in E8 (paper code: 50,000)"""
    planning_num_knns: int = 50
    """states averaged into the waypoint in E8 (paper code: 50)"""
    planning_num_recursions: int = 3
    """midpoint recursions in E8 (paper code: 3)"""
    reward_prompt_samples: int = 10_000
    """reward-labelled transitions for the least-squares prompt in E7 (ZSRL code: 10,000)"""
    reward_prompt_feature: Literal["diff", "next"] = "diff"
    """x in E7: 'diff' = phi(s') - phi(s) (paper); 'next' = [phi(s'), 1] for next-state rewards (ZSRL code)"""
    reward_prompt_ridge: float = 0.0
    """lambda in E7 relative to the mean eigenvalue of X^T X (0: least squares, minimum norm as pinv)"""
    skill_mix_ratio: float = 0.0
    """share of training z that are whitened features of the batch (E5 option; ZSRL code: 0.5), x as in E7"""

    RULES: ClassVar[dict[str, str]] = {  # checked by shared.args.cli before anything is built
        **dict.fromkeys("dataset_episodes dataset_episode_len total_steps checkpoint_every log_every latent_dim hidden_dim "
                        "num_layers lr batch_size temperature adv_clip planning_num_states planning_num_knns "
                        "reward_prompt_samples".split(), "> 0"),
        **dict.fromkeys("eval_every eval_episodes planning_num_recursions reward_prompt_ridge".split(), ">= 0"),
        **dict.fromkeys("discount expectile p_trajgoal p_randomgoal target_update_rate skill_expectile skill_discount "
                        "skill_mix_ratio".split(), "[0, 1]")}

    def check(self):
        kind, _, maze = self.env.partition("-")
        require(kind in ("maze2d", "pointmaze") and maze in MAZES, "env", self.env,
                f"must be maze2d-<maze> or pointmaze-<maze>, maze one of {', '.join(MAZES)}")
        require(self.dataset in ("diverse", "random") or self.dataset.endswith(".npz") or self.dataset.startswith("minari:"),
                "dataset", self.dataset, "must be diverse, random, a .npz path or minari:<local id>")
        if self.resume:
            check_resume_dir(pathlib.Path(self.resume), "hilp", Args, need_checkpoint=True)


# ---------------------------------------------------------------- objectives (pure functions of tensors)
def expectile_loss(adv, diff, expectile):
    """E3, elementwise: |tau - 1[adv < 0]| * diff^2 (the weight's sign comes from adv, spec §7)."""
    weight = torch.where(adv >= 0, expectile, 1.0 - expectile)
    return weight * diff**2


def hilbert_value(phi_s, phi_g):
    """E1: V(s, g) = -||phi(s) - phi(g)||, sqrt clamped at 1e-6 so the gradient is finite at s = g."""
    return -torch.sqrt(torch.clamp(((phi_s - phi_g) ** 2).sum(-1), min=1e-6))


def phi_value_loss(v, v_target, next_v_target, reward, mask, discount, expectile):
    """E4. v, v_target, next_v_target: [2, B] = V_i(s,g), Vbar_i(s,g), Vbar_i(s',g); reward, mask: [B]."""
    q = reward + discount * mask * next_v_target.min(0).values
    adv = q - v_target.mean(0)  # expectile weight from the TARGET-net advantage
    q_i = reward + discount * mask * next_v_target
    loss = expectile_loss(adv, q_i - v, expectile).mean(-1).sum()
    return loss, {"hilp/phi_loss": loss.item(), "hilp/v_mean": v.mean().item(), "hilp/adv_mean": adv.mean().item()}


def intrinsic_reward(phi_s, phi_next, z):
    """E5: r_z(s, s') = <phi(s') - phi(s), z>."""
    return ((phi_next - phi_s) * z).sum(-1)


def skill_value_loss(q_target_min, v, skill_expectile):
    """E6, IQL value: l_{tau_s}(min_i Qbar_i(s,a,z) - V(s,z))."""
    adv = q_target_min - v
    return expectile_loss(adv, adv, skill_expectile).mean()


def skill_critic_loss(q, reward, next_v, skill_discount):
    """E6, Q regression: sum_i mean(r_z + gamma_s V(s',z) - Q_i)^2; q: [2, B]; no terminal mask."""
    return ((reward + skill_discount * next_v - q) ** 2).mean(-1).sum()


def awr_loss(log_prob, adv, temperature, adv_clip):
    """E6, AWR: -mean(min(exp(beta * adv), clip) * log pi(a|s,z)); the weight carries no gradient."""
    weight = torch.clamp(torch.exp(temperature * adv), max=adv_clip).detach()
    return -(weight * log_prob).mean()


def goal_prompt(phi_s, phi_g):
    """E7 (goal): z = (phi(g) - phi(s)) / ||phi(g) - phi(s)||."""
    d = phi_g - phi_s
    return d / torch.clamp(d.norm(dim=-1, keepdim=True), min=1e-6)


def prompt_features(phi_s, phi_next, feature):
    """x of E7: 'diff' = phi(s') - phi(s); 'next' = phi(s') centred over the samples, i.e. [phi(s'), 1] with
    the constant column projected out (the same w, an unpenalised intercept)."""
    if feature == "diff":
        return phi_next - phi_s
    assert feature == "next", f"unknown reward prompt feature {feature!r}"
    return phi_next - phi_next.mean(0)


def ridge_inverse(x, ridge):
    """(X^T X + lambda I)^+ in float64, lambda = ridge * mean eigenvalue of X^T X; x: [N, D]."""
    x = x.double()
    gram = x.T @ x
    return torch.linalg.pinv(gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=x.dtype, device=x.device))


def reward_prompt(x, reward, ridge=0.0):
    """E7 (reward): w = (X^T X + lambda I)^+ X^T r, returned as (unit-norm z, w). x: [N, D], reward: [N]."""
    w = ridge_inverse(x, ridge) @ (x.double().T @ reward.double())
    return (w / torch.clamp(w.norm(), min=1e-12)).float(), w


def whitened_skills(x, ridge):
    """E5 option: for every row x_j, E7's z for the reward 1[i = j]: normalize((X^T X + lambda I)^+ x_j)."""
    return nn.functional.normalize((x.double() @ ridge_inverse(x, ridge)).float(), dim=-1)


def plan_waypoint(phi_s, phi_g, phi_states, num_knns, num_recursions):
    """E8, batched: for [N, D] phi_s / phi_g and [M, D] dataset phis, the latent waypoint [N, D]."""
    for _ in range(num_recursions):
        score = torch.maximum(torch.cdist(phi_s, phi_states), torch.cdist(phi_g, phi_states))
        idx = score.topk(num_knns, dim=-1, largest=False).indices  # [N, k]
        phi_g = phi_states[idx].mean(1)
    return phi_g


# ---------------------------------------------------------------- goal sampler (E2) and skills (E5)
def trajectory_ends(dones):
    """For every index t, the index of the last transition of its trajectory."""
    ends = np.nonzero(dones > 0)[0]
    return ends[np.searchsorted(ends, np.arange(len(dones)))]


def sample_goals(idx, traj_end, rng, discount, p_trajgoal):
    """E2: goal index per sampled index; success c = 1[goal == t] gives reward c - 1 and mask 1 - c."""
    k = rng.geometric(1.0 - discount, size=len(idx))  # k >= 1, mean 1 / (1 - gamma)
    traj_goal = np.minimum(idx + k, traj_end[idx])
    random_goal = rng.integers(len(traj_end), size=len(idx))
    goal = np.where(rng.random(len(idx)) < p_trajgoal, traj_goal, random_goal)
    success = (goal == idx).astype(np.float32)
    return goal, success - 1.0, 1.0 - success


def sample_skills(n, dim, device="cpu"):
    """E5: z ~ Uniform(unit sphere in R^D), fresh for every sample."""
    z = torch.randn(n, dim, device=device)
    return z / z.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- networks
def mlp(inp, hidden, layers, out, act=nn.GELU, layer_norm=True):
    """Linear -> act -> LayerNorm per hidden layer (the code's LayerNormMLP), then a linear head."""
    mods, d = [], inp
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), act()] + ([nn.LayerNorm(hidden)] if layer_norm else [])
        d = hidden
    return nn.Sequential(*mods, nn.Linear(d, out))


class Ensemble(nn.Module):
    """Two independent copies of an MLP; output [2, ..., out]."""

    def __init__(self, *a, **kw):
        super().__init__()
        self.nets = nn.ModuleList([mlp(*a, **kw) for _ in range(2)])

    def forward(self, x):
        return torch.stack([n(x) for n in self.nets])


class Actor(nn.Module):
    """Gaussian policy, ReLU MLP mean, state-independent log-std (init 0, clipped to [-5, 2])."""

    def __init__(self, inp, act_dim, hidden, layers):
        super().__init__()
        self.mean = mlp(inp, hidden, layers, act_dim, act=nn.ReLU, layer_norm=False)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def log_prob(self, x, a):
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self.mean(x), std).log_prob(a).sum(-1)


class HILP(nn.Module):
    def __init__(self, obs_dim, act_dim, args):
        super().__init__()
        h, n, d = args.hidden_dim, args.num_layers, args.latent_dim
        self.phi = Ensemble(obs_dim, h, n, d)  # phi_1, phi_2
        self.phi_target = Ensemble(obs_dim, h, n, d)
        self.value = mlp(obs_dim + d, h, n, 1)  # V(s, z)
        self.critic = Ensemble(obs_dim + d + act_dim, h, n, 1)  # Q_1, Q_2 (s, z, a)
        self.critic_target = Ensemble(obs_dim + d + act_dim, h, n, 1)
        self.actor = Actor(obs_dim + d, act_dim, h, n)
        self.phi_target.load_state_dict(self.phi.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.phi_target.requires_grad_(False)
        self.critic_target.requires_grad_(False)

    @torch.no_grad()
    def embed(self, obs):
        """phi used downstream: the first member phi_1, current weights, no gradient."""
        return self.phi.nets[0](obs)

    @torch.no_grad()
    def act(self, obs, z):
        """Evaluation action: the policy mean, clipped to [-1, 1]."""
        return self.actor.mean(torch.cat([obs, z], -1)).clamp(-1.0, 1.0)


# ---------------------------------------------------------------- one update
def losses(agent, batch, z, args):
    """The four terms {phi, value, critic, actor}; each reaches only its own module (spec §2, §7)."""
    s, a, s2, g = batch["obs"], batch["act"], batch["next_obs"], batch["goal"]
    # Hilbert representation (E1, E4); one forward pass per ensemble over the stacked inputs
    phi_s, phi_g = agent.phi(torch.cat([s, g])).chunk(2, dim=1)
    v = hilbert_value(phi_s, phi_g)
    with torch.no_grad():
        tphi_s, tphi_s2, tphi_g = agent.phi_target(torch.cat([s, s2, g])).chunk(3, dim=1)
        v_t, next_v_t = hilbert_value(tphi_s, tphi_g), hilbert_value(tphi_s2, tphi_g)
    loss_phi, info = phi_value_loss(v, v_t, next_v_t, batch["reward"], batch["mask"], args.discount, args.expectile)
    # HILP policy: intrinsic reward from the frozen current phi_1 (E5), then IQL + AWR (E6)
    r_z = intrinsic_reward(phi_s[0].detach(), agent.embed(s2), z)
    sz, saz = torch.cat([s, z], -1), torch.cat([s, z, a], -1)
    with torch.no_grad():
        q_t = agent.critic_target(saz).squeeze(-1).min(0).values
        next_v = agent.value(torch.cat([s2, z], -1)).squeeze(-1)
    v_sz = agent.value(sz).squeeze(-1)
    loss_v = skill_value_loss(q_t, v_sz, args.skill_expectile)
    loss_q = skill_critic_loss(agent.critic(saz).squeeze(-1), r_z, next_v, args.skill_discount)
    adv = q_t - v_sz.detach()
    log_prob = agent.actor.log_prob(sz, a)
    loss_pi = awr_loss(log_prob, adv, args.temperature, args.adv_clip)
    info.update({"hilp/skill_value_loss": loss_v.item(), "hilp/critic_loss": loss_q.item(),
                 "hilp/actor_loss": loss_pi.item(), "hilp/skill_adv": adv.mean().item(),
                 "hilp/intrinsic_reward": r_z.mean().item(), "hilp/bc_log_prob": log_prob.mean().item()})
    return {"phi": loss_phi, "value": loss_v, "critic": loss_q, "actor": loss_pi}, info


@torch.no_grad()
def polyak(target, online, rate):
    for pt, p in zip(target.parameters(), online.parameters()):
        pt.mul_(1.0 - rate).add_(p, alpha=rate)


def update(agent, opt, batch, args):
    z = sample_skills(len(batch["obs"]), args.latent_dim, batch["obs"].device)
    if args.skill_mix_ratio > 0:  # E5 option: a share of z are E7 answers for single-transition rewards
        x = prompt_features(agent.embed(batch["obs"]), agent.embed(batch["next_obs"]), args.reward_prompt_feature)
        mix = torch.rand(len(z), device=z.device) < args.skill_mix_ratio
        z = torch.where(mix[:, None], whitened_skills(x, args.reward_prompt_ridge)[torch.randperm(len(z), device=z.device)], z)
    terms, info = losses(agent, batch, z, args)
    loss = sum(terms.values())  # Total = L_phi + L_V + L_Q + L_pi, one Adam
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # as in the JAX code, targets move toward the parameters the loss was computed with
    polyak(agent.phi_target, agent.phi, args.target_update_rate)
    polyak(agent.critic_target, agent.critic, args.target_update_rate)
    opt.step()
    info["train/loss"] = loss.item()
    return info


# ---------------------------------------------------------------- helpers: env, data, batches, evaluation
def make_env(name):
    kind, maze = name.split("-", 1)
    if kind == "maze2d":
        return Maze2D(maze)
    if kind == "pointmaze":
        from shared.pointmaze import PointMaze
        return PointMaze(maze)
    raise ValueError(f"unknown env {name!r}")


def get_dataset(env, args):
    """Load / collect D and clip actions to +-(1 - 1e-5) (spec §3)."""
    if args.dataset.startswith("minari:"):
        from shared.pointmaze import load_minari
        data = load_minari(args.dataset.split(":", 1)[1])
    elif args.dataset.endswith(".npz"):
        data = load_dataset(args.dataset)
    else:
        path = os.path.join(args.data_dir, f"{args.env}__{args.dataset}__{args.dataset_episodes}x"
                                           f"{args.dataset_episode_len}__{args.seed}.npz")
        if not os.path.exists(path):
            save_dataset(path, env.collect(args.dataset, args.dataset_episodes, args.dataset_episode_len, args.seed))
        data = load_dataset(path)
    data["actions"] = np.clip(data["actions"], -1 + 1e-5, 1 - 1e-5)
    return data


def sample_batch(data, tensors, traj_end, rng, args):
    idx = rng.integers(len(traj_end), size=args.batch_size)
    goal, reward, mask = sample_goals(idx, traj_end, rng, args.discount, args.p_trajgoal)
    obs = tensors["observations"]
    dev = obs.device
    return {"obs": obs[idx], "act": tensors["actions"][idx], "next_obs": tensors["next_observations"][idx],
            "goal": obs[goal], "reward": torch.as_tensor(reward, device=dev), "mask": torch.as_tensor(mask, device=dev)}


def goal_policy(agent, device, plan_phis=None, args=None):
    """policy(obs, goal_obs) -> action with z from E7, or through the E8 waypoint when plan_phis is given."""
    def policy(obs, goal):
        o, g = torch.as_tensor(obs, device=device), torch.as_tensor(goal, device=device)
        phi_s, phi_g = agent.embed(o), agent.embed(g)
        if plan_phis is not None:
            phi_g = plan_waypoint(phi_s, phi_g, plan_phis, args.planning_num_knns, args.planning_num_recursions)
        return agent.act(o, goal_prompt(phi_s, phi_g)).cpu().numpy()
    return policy


def reward_prompting(agent, env, data, args, rng, act=None):
    """E7 for each of env.reward_tasks(): w from `reward_prompt_samples` reward-labelled dataset transitions,
    then the policy with z = w / |w| from every distinct task start (`act(obs, goal)` replaces it, e.g. a
    random baseline). Success = the episode ends in the reward's target region (episodes starting there are
    left out). Diagnostics: R^2 of the fit, singular values of X, whether the sampled dataset state with the
    largest phi^T z lies in the target region, and the size of the policy's reward (phi(s') - phi(s))^T z
    for this z relative to a random unit z ("signal"). Returns (scalar metrics, details)."""
    dev = torch.device(args.device)
    pick = rng.choice(len(data["observations"]), size=min(args.reward_prompt_samples, len(data["observations"])), replace=False)
    s, s2 = data["observations"][pick], data["next_observations"][pick]
    phi_s, phi_s2 = (agent.embed(torch.as_tensor(o, device=dev)) for o in (s, s2))
    x = prompt_features(phi_s, phi_s2, args.reward_prompt_feature)
    dphi = (phi_s2 - phi_s).double()  # the policy's reward is dphi^T z (E5) whatever x is
    sv = torch.linalg.svdvals(x.double()).cpu()
    out = {"eval/reward_prompt_cond": float(sv[0] / sv[-1].clamp_min(1e-12)),
           "eval/reward_prompt_rank": int((sv > 0.01 * sv[0]).sum())}  # singular values above 1 % of the largest
    details = {"feature": args.reward_prompt_feature, "ridge": args.reward_prompt_ridge, "singular_values": sv.tolist()}
    starts = [i for i, t in enumerate(env.tasks) if t[0] not in [u[0] for u in env.tasks[:i]]]
    start_ids = np.repeat(starts, args.eval_episodes)
    for name, (fn, in_target) in env.reward_tasks().items():
        r = torch.as_tensor(fn(s, s2), dtype=torch.float64, device=dev)
        z, w = reward_prompt(x, r, args.reward_prompt_ridge)
        resid = r - x.double() @ w - (r.mean() if args.reward_prompt_feature == "next" else 0.0)
        r2 = 1.0 - float((resid ** 2).sum() / torch.clamp(((r - r.mean()) ** 2).sum(), min=1e-12))
        best = s2[int((phi_s2 @ z).argmax())]  # the sampled state that phi^T z ranks highest
        # size of the intrinsic reward dphi^T z for this z relative to a random unit z (E||dphi z||^2 = ||dphi||_F^2 / D)
        signal = float((dphi @ z.double()).norm() / (dphi.norm() / dphi.shape[1] ** 0.5))
        pol = act or (lambda o, g, z=z: agent.act(torch.as_tensor(o, device=dev), z.expand(len(o), -1)).cpu().numpy())
        _, path, ret = env.rollout(pol, start_ids, seed=args.seed, reward_fn=fn)
        valid = ~in_target(path[:, 0])
        success = float(in_target(path[:, -1])[valid].mean()) if valid.any() else float("nan")
        out.update({f"eval/reward_success/{name}": success, f"eval/reward_return/{name}": float(ret.mean()),
                    f"eval/reward_r2/{name}": r2, f"eval/reward_argmax_in_target/{name}": float(in_target(best)),
                    f"eval/reward_signal/{name}": signal})
        details[name] = {"success": success, "return": float(ret.mean()), "r2": r2, "z": z.tolist(), "signal": signal,
                         "argmax_state": best.tolist(), "argmax_in_target": bool(in_target(best)), "episodes": int(valid.sum())}
    out["eval/reward_success"] = float(np.nanmean([v for k, v in out.items() if k.startswith("eval/reward_success/")]))
    return out, details


def evaluate(agent, env, data, args, step):
    """Goal-reaching success over the fixed tasks (E7, and E8), reward prompting (E7), phi vs BFS."""
    dev = torch.device(args.device)
    rng = np.random.default_rng(args.seed + 12345)  # own RNG: evaluation never moves the training RNGs
    task_ids = np.repeat(np.arange(len(env.tasks)), args.eval_episodes)
    out, paths = {}, {}
    modes = {"goal": None}
    if args.planning:
        pick = rng.choice(len(data["observations"]), size=min(args.planning_num_states, len(data["observations"])), replace=False)
        modes["plan"] = agent.embed(torch.as_tensor(data["observations"][pick], device=dev))
    for mode, plan_phis in modes.items():
        success, path, _ = env.rollout(goal_policy(agent, dev, plan_phis, args), task_ids, seed=args.seed)
        key = "eval/success" if mode == "goal" else "eval/success_plan"
        out[key] = float(success.mean())
        for t in range(len(env.tasks)):
            out[f"{key}_task{t}"] = float(success[task_ids == t].mean())
        paths[mode] = path
    metrics, details = reward_prompting(agent, env, data, args, rng)
    out.update(metrics)
    # does ||phi(s) - phi(g)|| order state pairs like the true shortest-path distance?
    i, j = rng.integers(len(data["observations"]), size=(2, 2000))
    oi, oj = data["observations"][i], data["observations"][j]
    dphi = (agent.embed(torch.as_tensor(oi, device=dev)) - agent.embed(torch.as_tensor(oj, device=dev))).norm(dim=-1)
    out["eval/phi_spearman"] = spearman(dphi.cpu().numpy(), env.geodesic(oi, oj))
    out["step"] = step
    return out, paths, details


# ---------------------------------------------------------------- main
def save_checkpoint(run_dir, agent, opt, step, rng):
    os.makedirs(os.path.join(run_dir, "checkpoint"), exist_ok=True)
    path = os.path.join(run_dir, "checkpoint", "trainer_state.pt")
    torch.save({"model": agent.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state}, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(args):
    start_step = 0
    if args.resume:  # the saved config wins, except run-length fields given explicitly on the command line
        saved = json.load(open(os.path.join(args.resume, "args.json")))
        for name in ("total_steps", "eval_every", "checkpoint_every", "track"):
            if getattr(args, name) != getattr(Args(), name):
                saved[name] = getattr(args, name)
        args, run_dir = Args(**{**saved, "resume": args.resume}), args.resume
    else:
        run_dir = str(make_run_dir("hilp", args.env, args.seed, args.output_dir))
    save_args(run_dir, args)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    dev = torch.device(args.device)
    env = make_env(args.env)
    data = get_dataset(env, args)
    tensors = {k: torch.as_tensor(data[k], device=dev) for k in ("observations", "actions", "next_observations")}
    traj_end = trajectory_ends(data["dones"])
    agent = HILP(data["observations"].shape[1], data["actions"].shape[1], args).to(dev)
    opt = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr)

    ckpt_path = os.path.join(run_dir, "checkpoint", "trainer_state.pt")
    if args.resume:
        # on the CPU: the RNG state must stay a CPU tensor; load_state_dict moves the rest to the device
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        agent.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        rng.bit_generator.state = ckpt["numpy_rng"]
        start_step = ckpt["step"]
        metrics_path = os.path.join(run_dir, "metrics.jsonl")  # drop lines logged after the checkpoint
        if os.path.exists(metrics_path):
            lines = [ln for ln in open(metrics_path) if json.loads(ln)["step"] <= start_step]
            open(metrics_path, "w").writelines(lines)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
    writer = None
    if args.track:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir)

    def log(metrics):
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        if writer is not None:
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(k, v, metrics["step"])

    # Ctrl-C: finish the current step, checkpoint, exit (a second Ctrl-C aborts at once)
    stop = []
    def on_sigint(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
    signal.signal(signal.SIGINT, on_sigint)

    step, result, prompting, t_last = start_step, {}, {}, time.time()
    pbar = tqdm.tqdm(range(start_step + 1, args.total_steps + 1), initial=start_step, total=args.total_steps, dynamic_ncols=True)
    for step in pbar:
        # ALGO LOGIC: sample a relabelled batch (E2), one update of all four losses (E4, E6)
        info = update(agent, opt, sample_batch(data, tensors, traj_end, rng, args), args)
        if step % args.log_every == 0 or step == args.total_steps:
            log({"step": step, **info, "perf/step_s": (time.time() - t_last) / args.log_every})
            t_last = time.time()
            pbar.set_postfix(phi=f"{info['hilp/phi_loss']:.3f}", actor=f"{info['hilp/actor_loss']:.2f}")
        if step % args.checkpoint_every == 0:
            save_checkpoint(run_dir, agent, opt, step, rng)
        if step % args.eval_every == 0 or step == args.total_steps:
            result, paths, prompting = evaluate(agent, env, data, args, step)
            log(result)
            np.savez_compressed(os.path.join(run_dir, "eval_paths.npz"), **paths)
            json.dump({"step": step, **prompting}, open(os.path.join(run_dir, "reward_prompting.json"), "w"), indent=1)
            tqdm.tqdm.write(f"step {step}: success {result['eval/success']:.3f} "
                            f"plan {result.get('eval/success_plan', float('nan')):.3f} "
                            f"reward prompting {result['eval/reward_success']:.3f} "
                            f"phi spearman {result['eval/phi_spearman']:.3f}")
            t_last = time.time()
        if stop:
            print(f"interrupted: checkpoint at step {step}; continue with --resume {run_dir}")
            break
    signal.signal(signal.SIGINT, signal.default_int_handler)
    save_checkpoint(run_dir, agent, opt, step, rng)
    metrics_file.close()
    if writer is not None:
        writer.close()
    return {"run_dir": run_dir, "agent": agent, "data": data, "env": env, "reward_prompting": prompting, **result}


if __name__ == "__main__":
    main(cli(Args))

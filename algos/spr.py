"""SPR: Self-Predictive Representations on Atari 100k.

Paper: Schwarzer, Anand, Goel, Hjelm, Courville, Bachman, "Data-Efficient Reinforcement Learning with
Self-Predictive Representations", ICLR 2021, arXiv:2007.05929 (official code: mila-iqia/spr).
Spec: shared/papers/spr.md (section numbers below refer to it).

Idea: Data-Efficient Rainbow (C51 + dueling + noisy nets + 10-step returns + prioritized replay +
double Q) plus an auxiliary BYOL-style loss. From the online latent of o_t a small convolutional
transition model, fed the actions actually taken, rolls K=5 steps forward; each predicted latent,
projected and passed through a predictor, must point in the same direction as the projected latent
that a gradient-free target encoder computes from the real, independently augmented o_{t+k}.

Equations (spec §2; paper §2.2):
  (1) z_t = R(f_o(aug(o_t))),  R(x) = (x - min x) / (max x - min x) per sample
  (2) zhat_t = z_t,  zhat_{t+k} = h(zhat_{t+k-1}, a_{t+k-1}),  k = 1..K
  (3) yhat_{t+k} = q(g_o(zhat_{t+k})),  ytil_{t+k} = g_m(R(f_m(aug(o_{t+k}))))   (no gradient)
  (4) L_SPR = lambda_code * mean_k m_{t,k} ||yhat/|yhat| - ytil/|ytil| ||^2, lambda_code = 5
      (= paper -lambda sum_k cos(yhat, ytil) with lambda = 2, up to a constant, since
      ||u - v||^2 = 2 - 2cos for unit vectors); m_{t,k} = 0 once an episode ended before o_{t+k}
  (5) theta_m <- tau theta_m + (1 - tau) theta_o, tau = 0 with augmentation, 0.99 without
      (paper convention: weight on the old target; the code's flag is 1 - tau)
  (6) L_RL = -sum_j m_j log p_o(aug(o_t))[a_t, j], m = C51 projection of
      clip(G + (1-d) gamma^n z_j, V_min, V_max) under p_targ(aug(o_{t+n}))[argmax_a Q_o(aug(o_{t+n}), a)]
  Total per sample: w_i (L_RL + L_SPR), mean over the batch; w_i = PER importance weight.

Simplified vs the official code (spec §8 lists these as droppable): no reward head, no dropout in the
no-augmentation setting, no k=0 SPR term (weight 0 in the code), target encoder updated at the start
of an update (the code: mid-forward), the Q target net draws its own noise, frames resized by
gymnasium (INTER_AREA; rlpyt: bilinear) and no extra no-op frame after a life loss, a game
interrupted by --resume is cut (its last transition is marked done). Kept from the code: the 5x-mean
loss scale, per-module grad clipping, noisy bias sigma0/sqrt(out), zero-padded stacks after any done,
PER beta reaching 1 at step 100k also in shorter runs (so a short run is not annealed faster).
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import copy
import os
import signal
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from shared.args import cli, require
from shared.atari import game_name, human_normalized_score, make_env
from shared.run import (MetricsLogger, check_resume_dir, make_run_dir, rng_state, save_args, seed_everything,
                        set_rng_state)


@dataclass
class Args:
    # experiment
    env_id: str = "BreakoutNoFrameskip-v4"
    """Atari game as `{Game}NoFrameskip-v4` (Atari-100k protocol, spec §6)"""
    seed: int = 1
    """seed of python, numpy, torch, the env and the replay sampler"""
    output_dir: str = "runs"
    """runs land in `{output_dir}/{spr|der_aug|der}__{game}__{seed}__{time}/`"""
    resume: str = ""
    """a run directory to continue (model, optimizer, replay buffer, RNG and step come back)"""
    track: bool = False
    """write TensorBoard scalars into the run directory (and to W&B if `wandb_project_name` is set)"""
    wandb_project_name: str = ""
    """W&B project, used only with --track"""
    total_steps: int = 100_000
    """agent steps (4 frames each): 100k steps = 400k frames (spec §5)"""
    eval_episodes: int = 100
    """episodes of the final evaluation (spec §4.5: 100, eps 0.001, no life-loss terminal)"""
    eval_every: int = 0
    """also evaluate every this many steps (0: only at the end)"""
    checkpoint_every: int = 10_000
    """steps between checkpoints (also written at the end and on Ctrl-C)"""
    log_every: int = 1_000
    """steps between loss / speed lines in metrics.jsonl"""
    compile: bool = False
    """torch.compile the loss computation"""
    cuda: bool = True
    """use the GPU when there is one"""
    max_episode_frames: int = 108_000
    """episode cap in frames (108k frames = 27k agent steps, spec §5)"""

    # algorithm
    spr: bool = True
    """the SPR loss; --no-spr: DER + augmentation on the same code path (run name der_aug), and with
    --no-augmentation too: DER without augmentation (run name der), both with SPR's other hyperparameters"""
    augmentation: bool = True
    """aug(.) of spec §2 (random shift + intensity) on every encoder input during updates"""
    spr_weight: float = 5.0
    """lambda in (4), code convention: 5 x mean over k == paper lambda = 2 on the summed cosine"""
    jumps: int = 5
    """K: steps the transition model is rolled forward"""
    tau: float | None = None
    """tau in (5), paper convention (weight on the old target); None: 0 with augmentation, 0.99 without"""
    lr: float = 1e-4
    """Adam learning rate"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    batch_size: int = 32
    """sequences per update"""
    replay_ratio: int = 2
    """updates per env step (code: replay_ratio 64 / batch 32)"""
    learning_starts: int = 2000
    """warm-up steps with uniform random actions before the first update"""
    buffer_size: int = 100_000
    """replay capacity in transitions (single frames)"""
    n_step: int = 10
    """n of the n-step return"""
    gamma: float = 0.99
    """discount gamma"""
    n_atoms: int = 51
    """C51 atoms"""
    v_min: float = -10.0
    """V_min of the C51 support"""
    v_max: float = 10.0
    """V_max of the C51 support"""
    hidden_size: int = 256
    """width of the Q head's hidden layers (the projection g is 2 x this)"""
    noisy_sigma0: float = 0.5
    """sigma_0 of the factorised noisy layers"""
    per_alpha: float = 0.5
    """PER priority exponent alpha"""
    per_beta: float = 0.4
    """PER importance exponent beta at learning start, annealed linearly to 1 at `per_beta_steps`"""
    per_beta_steps: int = 100_000
    """agent step at which beta reaches 1 (official code: 100k, whatever the run's length)"""
    target_update_period: int = 1
    """updates between hard copies of the online net into the Q target net"""
    max_grad_norm: float = 10.0
    """gradient-norm clip (encoder + Q head, and transition model, clipped separately as in the code)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy"""

    RULES: ClassVar[dict[str, str]] = {  # checked by shared.args.cli before anything is built
        **dict.fromkeys("total_steps checkpoint_every log_every max_episode_frames lr adam_eps batch_size replay_ratio "
                        "buffer_size hidden_size per_beta_steps max_grad_norm".split(), "> 0"), "n_atoms": ">= 2",
        **dict.fromkeys("eval_episodes eval_every learning_starts spr_weight noisy_sigma0 per_alpha".split(), ">= 0"),
        **dict.fromkeys("jumps n_step target_update_period".split(), ">= 1"),
        **dict.fromkeys("tau gamma per_beta eval_epsilon".split(), "[0, 1]")}

    def check(self):
        import gymnasium as gym
        require(self.env_id in gym.registry, "env_id", self.env_id, "not an Atari game id (e.g. BoxingNoFrameskip-v4)")
        require(self.v_min < self.v_max, "v_max", self.v_max, f"must be > --v-min {self.v_min}")
        require(self.learning_starts > max(self.jumps, self.n_step) + 3, "learning_starts", self.learning_starts,
                "must exceed max(--jumps, --n-step) + 3 (the warm-up must fill one sequence)")
        if self.resume:
            check_resume_dir(pathlib.Path(self.resume), "spr", Args, need_checkpoint=False)

    def __post_init__(self):
        if self.tau is None:  # spec §2/§8: the augmented result uses a hard copy every update
            self.tau = 0.0 if self.augmentation else 0.99


# ---------------------------------------------------------------- objectives and pure helpers
def spr_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(4) without lambda: mean_k m_k ||pred/|pred| - target/|target| ||^2 = mean_k m_k (2 - 2cos).
    pred, target: [B, K, D]; mask: [B, K] -> per-sample loss [B]. Normalised with eps 1e-3 (code)."""
    p = F.normalize(pred.float(), dim=-1, eps=1e-3)
    t = F.normalize(target.float(), dim=-1, eps=1e-3)
    return ((p - t).pow(2).sum(-1) * mask).mean(-1)


def c51_projection(next_p: torch.Tensor, returns: torch.Tensor, dones: torch.Tensor,
                   gamma_n: float, support: torch.Tensor) -> torch.Tensor:
    """(6): shrink/shift the atoms, Tz_j = clip(G + (1-d) gamma^n z_j, V_min, V_max), and spread each
    atom's mass p_j onto its two grid neighbours: m_i = sum_j p_j clip(1 - |Tz_j - z_i| / dz, 0, 1).
    next_p: [B, N] target pmf; returns, dones: [B] -> m: [B, N], sums to 1."""
    dz = support[1] - support[0]
    tz = (returns[:, None] + (1 - dones[:, None]) * gamma_n * support).clamp(support[0], support[-1])
    coef = (1 - (tz[:, None, :] - support[None, :, None]).abs() / dz).clamp(0, 1)  # [B, i, j]
    return (coef * next_p[:, None, :]).sum(-1)


def n_step_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """G = sum_{i<n} gamma^i r_{t+i}, stopped after the first done; d = a done within the n steps.
    rewards, dones: [B, n] for steps t..t+n-1 -> (G [B], d [B]) as float32."""
    alive = np.cumprod(1.0 - dones, axis=1)  # alive[:, i]: no done in t..t+i
    counts = np.concatenate([np.ones_like(alive[:, :1]), alive[:, :-1]], axis=1)  # r_{t+i} counts
    G = (rewards * counts * gamma ** np.arange(rewards.shape[1])).sum(1)
    return G.astype(np.float32), dones.any(1).astype(np.float32)


def augment(x: torch.Tensor, pad: int = 4, intensity: float = 0.05) -> torch.Tensor:
    """aug(.) of spec §2 on float images [B, C, H, W]: replicate-pad `pad` px and crop back at a random
    offset (one shift per sample, shared by its C stacked frames), then multiply by
    1 + intensity * clip(N(0,1), -2, 2), one scalar per sample. Fresh randomness on every call."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate").flatten(2)  # [B, C, (H+2p)(W+2p)]
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1, 1), device=x.device)
    rows = dy + torch.arange(H, device=x.device).view(1, H, 1)
    cols = dx + torch.arange(W, device=x.device).view(1, 1, W)
    idx = (rows * (W + 2 * pad) + cols).view(B, 1, H * W).expand(B, C, H * W)
    out = padded.gather(2, idx).view(B, C, H, W)
    return out * (1 + intensity * torch.randn(B, 1, 1, 1, device=x.device).clamp(-2, 2))


def renormalize(z: torch.Tensor) -> torch.Tensor:
    """R(x) of (1): per-sample min-max scaling to [0, 1] over all C*H*W (guarded against max == min)."""
    flat = z.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-8)).view_as(z)


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by `scale` (the code's 1/sqrt(2) into the Q head)."""
    return x * scale + x.detach() * (1 - scale)


@torch.no_grad()
def ema_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """(5): theta_m <- tau theta_m + (1 - tau) theta_o (tau = 0: copy)."""
    for p_m, p_o in zip(target.parameters(), online.parameters()):
        p_m.mul_(tau).add_(p_o, alpha=1 - tau)


# ---------------------------------------------------------------- network (spec §3)
class NoisyLinear(nn.Module):
    """Factorised Gaussian noisy layer (Fortunato et al. 2018), SPR's init: mu ~ U(+-1/sqrt(in)),
    sigma_w = sigma0/sqrt(in), sigma_b = sigma0/sqrt(out). `noise=False` uses the mean weights."""

    def __init__(self, n_in: int, n_out: int, sigma0: float):
        super().__init__()
        r = n_in ** -0.5
        self.weight_mu = nn.Parameter(torch.empty(n_out, n_in).uniform_(-r, r))
        self.weight_sigma = nn.Parameter(torch.full((n_out, n_in), sigma0 * r))
        self.bias_mu = nn.Parameter(torch.empty(n_out).uniform_(-r, r))
        self.bias_sigma = nn.Parameter(torch.full((n_out,), sigma0 * n_out ** -0.5))
        self.register_buffer("weight_eps", torch.zeros(n_out, n_in))
        self.register_buffer("bias_eps", torch.zeros(n_out))
        self.reset_noise()

    @torch.no_grad()
    def reset_noise(self):
        f = lambda n: (x := torch.randn(n, device=self.weight_mu.device)).sign() * x.abs().sqrt()
        eps_in, eps_out = f(self.weight_mu.shape[1]), f(self.weight_mu.shape[0])
        self.weight_eps.copy_(torch.outer(eps_out, eps_in))
        self.bias_eps.copy_(eps_out)

    def forward(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        if not noise:
            return F.linear(x, self.weight_mu, self.bias_mu)
        return F.linear(x, self.weight_mu + self.weight_sigma * self.weight_eps,
                        self.bias_mu + self.bias_sigma * self.bias_eps)


class QHead(nn.Module):
    """Dueling C51 head: value 3136->256->N, advantage 3136->256->A*N plus a learned per-atom bias;
    logits = V + A - mean_a A. Its first layers double as the SPR projection g."""

    def __init__(self, n_actions: int, args: Args, n_in: int = 64 * 7 * 7):
        super().__init__()
        self.n_actions, self.n_atoms = n_actions, args.n_atoms
        s, h = args.noisy_sigma0, args.hidden_size
        self.value1, self.value2 = NoisyLinear(n_in, h, s), NoisyLinear(h, args.n_atoms, s)
        self.adv1, self.adv2 = NoisyLinear(n_in, h, s), NoisyLinear(h, n_actions * args.n_atoms, s)
        self.adv_bias = nn.Parameter(torch.zeros(args.n_atoms))

    def forward(self, z: torch.Tensor, noise: bool = True) -> torch.Tensor:
        x = scale_grad(z.flatten(1), 2 ** -0.5)
        v = self.value2(F.relu(self.value1(x, noise)), noise).view(-1, 1, self.n_atoms)
        a = self.adv2(F.relu(self.adv1(x, noise)), noise).view(-1, self.n_actions, self.n_atoms)
        a = a + self.adv_bias
        return v + a - a.mean(1, keepdim=True)  # logits [B, A, N]

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """g: first hidden layer of both streams, noise off, no ReLU, concatenated (512-d)."""
        x = z.flatten(1)
        return torch.cat([self.value1(x, noise=False), self.adv1(x, noise=False)], -1)

    def reset_noise(self):
        for layer in (self.value1, self.value2, self.adv1, self.adv2):
            layer.reset_noise()


class TransitionModel(nn.Module):
    """h of (2): concat a one-hot action plane per action, Conv3x3-ReLU-BN-Conv3x3-ReLU, then R."""

    def __init__(self, n_actions: int, channels: int = 64):
        super().__init__()
        self.n_actions = n_actions
        self.conv1 = nn.Conv2d(channels + n_actions, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        planes = F.one_hot(action, self.n_actions).to(z.dtype)[:, :, None, None].expand(-1, -1, *z.shape[2:])
        x = self.bn(F.relu(self.conv1(torch.cat([z, planes], 1))))
        return renormalize(F.relu(self.conv2(x)))


class SPRNetwork(nn.Module):
    """Online network: encoder f_o, Q head (with projection g_o), transition h, predictor q."""

    def __init__(self, n_actions: int, args: Args):
        super().__init__()
        n_actions = int(n_actions)  # gymnasium gives a numpy int, which torch.compile would trace as a tensor
        self.encoder = nn.Sequential(nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(),  # 4x84x84 -> 64x7x7
                                     nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(), nn.Conv2d(64, 64, 3, stride=1), nn.ReLU())
        self.head = QHead(n_actions, args)
        self.transition = TransitionModel(n_actions)
        self.predictor = nn.Linear(2 * args.hidden_size, 2 * args.hidden_size)
        self.register_buffer("support", torch.linspace(args.v_min, args.v_max, args.n_atoms))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1) without aug: x float in [0, 1], [B, 4, 84, 84] -> z [B, 64, 7, 7]."""
        return renormalize(self.encoder(x))

    def q_values(self, obs: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Q(o, a) = sum_j z_j p_j(o, a) for uint8 observations [B, 4, 84, 84] (no augmentation)."""
        p = F.softmax(self.head(self.encode(obs.float() / 255), noise), -1)
        return (p * self.support).sum(-1)


def compute_losses(net: SPRNetwork, q_target: SPRNetwork, spr_target: SPRNetwork, batch: dict,
                   args: Args) -> dict:
    """One update's losses for a batch of sequences (spec §4.4 b-c). Returns the scalar `loss` and
    per-sample `td` (L_RL), `spr` (lambda L_SPR) and `kl` (PER priority KL(m || p), detached)."""
    aug = augment if args.augmentation else (lambda x: x)
    img = lambda o: aug(o.float() / 255)
    obs, actions = batch["obs"], batch["actions"]  # [B, K+1, 4, 84, 84] o_t..o_{t+K}; [B, K] a_t..
    B, rows, support = obs.shape[0], torch.arange(obs.shape[0], device=obs.device), net.support

    # (6) distributional double-Q n-step loss
    z = net.encode(img(obs[:, 0]))
    log_p = F.log_softmax(net.head(z), -1)[rows, actions[:, 0]]  # [B, N]
    with torch.no_grad():
        next_obs = batch["next_obs"]  # o_{t+n}
        next_a = (F.softmax(net.head(net.encode(img(next_obs))), -1) * support).sum(-1).argmax(1)
        next_p = F.softmax(q_target.head(q_target.encode(img(next_obs))), -1)[rows, next_a]
        m = c51_projection(next_p, batch["returns"], batch["dones"], args.gamma ** args.n_step, support)
    td = -(m * log_p).sum(-1)
    m_safe = m.clamp(1e-6, 1)
    kl = (m_safe * (m_safe.log() - log_p.detach())).sum(-1).clamp(1e-6, 1e6)

    # (2)-(4) self-predictive loss
    if args.spr:
        latents, zhat = [], z
        for k in range(1, args.jumps + 1):
            zhat = net.transition(zhat, actions[:, k - 1])  # step k consumes a_{t+k-1}
            latents.append(zhat)
        pred = net.predictor(net.head.project(torch.stack(latents, 1).flatten(0, 1))).view(B, args.jumps, -1)
        with torch.no_grad():  # targets from the real o_{t+1..t+K}
            future = img(obs[:, 1:].flatten(0, 1))
            target = spr_target.head.project(spr_target.encode(future)).view(B, args.jumps, -1)
        spr = args.spr_weight * spr_loss(pred, target, batch["spr_mask"])
    else:
        spr = torch.zeros_like(td)
    loss = (batch["weights"] * (td + spr)).mean()
    return {"loss": loss, "td": td.detach(), "spr": spr, "kl": kl}


# ---------------------------------------------------------------- prioritized replay of single frames
class PrioritizedReplay:
    """Replay that stores one 84x84 frame per step (spec §8: not 4x stacks), with proportional PER.
    Item t = (newest frame of o_t, a_t, sign-clipped r_t, done_t). Stacks, the sequence o_t..o_{t+K},
    o_{t+n}, n-step returns and SPR masks are rebuilt at sampling time; a stack is zero-padded across
    a done, exactly like the env's FrameStackObservation(padding_type="zero") after each done.
    Sum tree: leaves hold priority^alpha, inner nodes the sums of their children."""

    def __init__(self, capacity: int, horizon: int, alpha: float, seed: int, stack: int = 4):
        self.cap, self.horizon, self.alpha, self.stack = capacity, horizon, alpha, stack
        self.frames = np.zeros((capacity, 84, 84), np.uint8)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, bool)
        self.leaves = 1 << max(capacity - 1, 1).bit_length()
        self.tree = np.zeros(2 * self.leaves)
        self.t = 0  # transitions ever added
        self.rng = np.random.default_rng(seed)

    def _set(self, idx, value):
        i = np.asarray(idx, np.int64) + self.leaves
        self.tree[i] = value
        while i[0] > 1:
            i = np.unique(i // 2)
            self.tree[i] = self.tree[2 * i] + self.tree[2 * i + 1]

    def add(self, frame: np.ndarray, action: int, reward: float, done: bool):
        i = self.t % self.cap
        self.frames[i], self.actions[i], self.rewards[i], self.dones[i] = frame, action, reward, done
        self._set((i + np.arange(self.stack)) % self.cap, 0.0)  # i and stacks that read overwritten frames
        if self.t >= self.horizon:  # item t - horizon now has its whole sequence: priority 1 (spec §2)
            self._set([(self.t - self.horizon) % self.cap], 1.0)
        self.t += 1

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray):
        self._set(idx, priorities ** self.alpha)

    def stacks(self, idx: np.ndarray) -> np.ndarray:
        """Frame stacks o_idx for any integer array idx -> [..., 4, 84, 84] uint8."""
        j = idx[..., None] + np.arange(1 - self.stack, 1)
        frames = self.frames[j % self.cap]
        d = self.dones[j[..., :-1] % self.cap]  # done flags at t-3, t-2, t-1
        stale = np.flip(np.cumsum(np.flip(d, -1), -1), -1) > 0  # a done between that frame and t
        age = (self.t - 1 - idx[..., None]) % self.cap  # adds since item t was written
        stale |= age + np.arange(self.stack - 1, 0, -1) >= min(self.t, self.cap)  # before the first / overwritten
        frames[..., :-1, :, :][stale] = 0
        return frames

    def sample(self, batch_size: int, beta: float, jumps: int, n_step: int, gamma: float) -> dict:
        """Stratified proportional sampling of start indices t, plus everything one update needs."""
        mass = (np.arange(batch_size) + self.rng.random(batch_size)) * self.tree[1] / batch_size
        i = np.ones(batch_size, np.int64)
        while i[0] < self.leaves:  # descend; never into an empty subtree (float round-off guard)
            left = 2 * i
            right = (mass >= self.tree[left]) & (self.tree[left + 1] > 0)
            mass, i = np.where(right, mass - self.tree[left], mass), left + right
        idx, prio = i - self.leaves, self.tree[i]
        weights = (1.0 / prio) ** beta
        seq = idx[:, None] + np.arange(max(jumps, n_step) + 1)  # t..t+horizon
        dones = self.dones[seq[:, :n_step] % self.cap]
        returns, done_n = n_step_returns(self.rewards[seq[:, :n_step] % self.cap], dones, gamma)
        return {
            "idx": idx,
            "obs": self.stacks(seq[:, : jumps + 1]),  # o_t..o_{t+K}
            "actions": self.actions[seq[:, : max(jumps, 1)] % self.cap],  # a_t..a_{t+K-1}
            "returns": returns, "dones": done_n,
            "next_obs": self.stacks(seq[:, n_step]),  # o_{t+n}
            # m_{t,k} = 1 iff no done among done_t..done_{t+k-1} (o_{t+k} is in the same episode)
            "spr_mask": (np.cumsum(self.dones[seq[:, :jumps] % self.cap], 1) == 0).astype(np.float32),
            "weights": (weights / weights.max()).astype(np.float32),
        }

    def state_dict(self) -> dict:
        n = min(self.t, self.cap)
        return {"frames": self.frames[:n], "actions": self.actions[:n], "rewards": self.rewards[:n],
                "dones": self.dones[:n], "tree": self.tree, "t": self.t, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict):
        assert len(s["tree"]) == len(self.tree), "resume with the same --buffer-size"
        n = len(s["frames"])
        self.frames[:n], self.actions[:n], self.rewards[:n], self.dones[:n] = (
            s["frames"], s["actions"], s["rewards"], s["dones"])
        self.tree[:], self.t = s["tree"], s["t"]
        self.rng.bit_generator.state = s["rng"]


# ---------------------------------------------------------------- one update, evaluation, checkpoint
def update(net, q_target, spr_target, optimizer, replay, args: Args, beta: float, loss_fn, n_updates: int) -> dict:
    """Spec §4.4 a-e: sample, losses, backward, clip, Adam step, priorities, target updates."""
    device = net.support.device
    batch = replay.sample(args.batch_size, beta, args.jumps if args.spr else 0, args.n_step, args.gamma)
    idx = batch.pop("idx")
    batch = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    net.head.reset_noise()  # b. fresh noise for the online net ...
    q_target.head.reset_noise()  # ... and its own sample for the target net
    if args.spr:  # (5) on f_m and g_m (g lives in the head), before the targets are computed (spec §8)
        ema_(spr_target.encoder, net.encoder, args.tau)
        ema_(spr_target.head, net.head, args.tau)
    out = loss_fn(net, q_target, spr_target, batch, args)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = nn.utils.clip_grad_norm_([*net.encoder.parameters(), *net.head.parameters()], args.max_grad_norm)
    nn.utils.clip_grad_norm_(net.transition.parameters(), args.max_grad_norm)
    optimizer.step()
    replay.update_priorities(idx, out["kl"].cpu().numpy().astype(np.float64))
    if (n_updates + 1) % args.target_update_period == 0:
        q_target.load_state_dict(net.state_dict())
    return {"train/loss": out["loss"].item(), "train/td_loss": out["td"].mean().item(),
            "spr/loss": out["spr"].mean().item(), "train/grad_norm": grad_norm.item()}


@torch.no_grad()
def evaluate(net: SPRNetwork, args: Args, episodes: int, seed: int) -> list[float]:
    """Raw returns of full games (no life-loss terminal), eps-greedy with eps 0.001, noise off."""
    env = make_env(args.env_id, seed, train=False, max_episode_frames=args.max_episode_frames)
    rng, returns, device = np.random.default_rng(seed), [], net.support.device
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        if rng.random() < args.eval_epsilon:
            action = int(rng.integers(env.action_space.n))
        else:
            action = net.q_values(torch.as_tensor(obs, device=device)[None], noise=False).argmax().item()
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            obs, _ = env.reset()
    env.close()
    return returns


def save_checkpoint(run_dir: pathlib.Path, step: int, n_updates: int, nets: dict, optimizer, replay):
    ckpt = run_dir / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    state = {"step": step, "n_updates": n_updates, "optimizer": optimizer.state_dict(),
             **{k: v.state_dict() for k, v in nets.items()}, "rng": rng_state()}
    torch.save(replay.state_dict(), ckpt / "replay.pt.tmp")
    torch.save(state, ckpt / "trainer_state.pt.tmp")
    for name in ("replay.pt", "trainer_state.pt"):  # both written before either replaces the old pair
        os.replace(ckpt / f"{name}.tmp", ckpt / name)
    torch.save(nets["net"].state_dict(), ckpt / "model.pt")


# ---------------------------------------------------------------- main
def main(args: Args):
    game, algo = game_name(args.env_id), "spr" if args.spr else "der_aug" if args.augmentation else "der"
    # Ctrl-C and `kill` both checkpoint (SIGINT arrives ignored in jobs started with `&` or nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_dir = pathlib.Path(args.resume) if args.resume else make_run_dir(algo, game, args.seed, args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)  # a --resume directory without a checkpoint starts fresh
    save_args(run_dir, args)
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    env = make_env(args.env_id, args.seed, train=True, max_episode_frames=args.max_episode_frames)
    net = SPRNetwork(env.action_space.n, args).to(device)
    q_target, spr_target = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)
    nets = {"net": net, "q_target": q_target, "spr_target": spr_target}
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr, eps=args.adam_eps)
    replay = PrioritizedReplay(args.buffer_size, max(args.jumps, args.n_step), args.per_alpha, args.seed)
    start, n_updates = 0, 0
    if args.resume and (run_dir / "checkpoint" / "trainer_state.pt").exists():
        # on the CPU: RNG states must stay CPU tensors; weights and Adam moments move to the params' device
        state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=False)
        for k, module in nets.items():
            module.load_state_dict(state[k])
        optimizer.load_state_dict(state["optimizer"])
        replay.load_state_dict(torch.load(run_dir / "checkpoint" / "replay.pt", weights_only=False))
        replay.dones[(replay.t - 1) % replay.cap] = True  # the interrupted game is cut here
        set_rng_state(state["rng"])
        start, n_updates = state["step"], state["n_updates"]
        print(f"resumed {run_dir} at step {start} ({replay.t} transitions in replay)")
    loss_fn = torch.compile(compute_losses) if args.compile else compute_losses

    logger = MetricsLogger(run_dir, track=args.track, config=args,
                           wandb_project=args.wandb_project_name if args.track else None)

    def run_eval(step: int, episodes: int):
        returns = evaluate(net, args, episodes, seed=args.seed + 10_000 + step)
        mean = float(np.mean(returns))
        logger.log({"eval/return_mean": mean, "eval/return_std": float(np.std(returns)),
                    "eval/episodes": len(returns), "eval/hns": human_normalized_score(game, mean)}, step)
        return mean

    obs, _ = env.reset(seed=args.seed + start)
    stats, t_env, t_update, window_start, step, beta = [], 0.0, 0.0, time.perf_counter(), start, args.per_beta
    pbar = tqdm(range(start, args.total_steps), initial=start, total=args.total_steps, desc=f"{algo} {game}")
    try:
        for step in pbar:
            # ALGO LOGIC: act (uniform random during warm-up, then greedy w.r.t. the noisy net)
            t0 = time.perf_counter()
            if step < args.learning_starts:
                action = env.action_space.sample()
            else:
                with torch.no_grad():
                    action = net.q_values(torch.as_tensor(obs, device=device)[None]).argmax().item()
            next_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated  # game over, life lost or time limit (spec §4.3)
            replay.add(obs[-1], action, float(np.sign(reward)), done)  # clip in the learner only
            obs = env.reset()[0] if done else next_obs
            t_env += time.perf_counter() - t0
            if "episode" in info:  # a whole game ended (raw score)
                logger.log({"train/episodic_return": float(info["episode"]["r"]),
                            "train/episode_length": int(info["episode"]["l"])}, step + 1)
                pbar.set_postfix(ret=float(info["episode"]["r"]))

            # ALGO LOGIC: learn
            if step >= args.learning_starts:
                frac = (step - args.learning_starts) / max(1, args.per_beta_steps - args.learning_starts)
                beta = args.per_beta + (1 - args.per_beta) * min(1.0, frac)
                t0 = time.perf_counter()
                for _ in range(args.replay_ratio):
                    stats.append(update(net, q_target, spr_target, optimizer, replay, args, beta, loss_fn, n_updates))
                    n_updates += 1
                t_update += time.perf_counter() - t0

            if (step + 1) % args.log_every == 0:
                elapsed = time.perf_counter() - window_start
                m = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]} if stats else {}
                logger.log({**m, "perf/steps_per_s": args.log_every / elapsed, "perf/env_s": t_env / args.log_every,
                            "perf/update_s": t_update / max(1, len(stats)), "perf/updates": n_updates,
                            "train/per_beta": beta}, step + 1)
                stats, t_env, t_update, window_start = [], 0.0, 0.0, time.perf_counter()
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.total_steps:
                run_eval(step + 1, args.eval_episodes) if args.eval_episodes else None
            if (step + 1) % args.checkpoint_every == 0:
                save_checkpoint(run_dir, step + 1, n_updates, nets, optimizer, replay)
    except KeyboardInterrupt:
        save_checkpoint(run_dir, step, n_updates, nets, optimizer, replay)  # step `step` is redone on resume
        print(f"interrupted: checkpoint at step {step} in {run_dir}; continue with --resume {run_dir}")
        return run_dir

    save_checkpoint(run_dir, args.total_steps, n_updates, nets, optimizer, replay)
    if args.eval_episodes > 0:
        mean = run_eval(args.total_steps, args.eval_episodes)
        print(f"eval after {args.total_steps} steps: return {mean:.1f}, HNS {human_normalized_score(game, mean):.3f}")
    env.close(), logger.close()
    return run_dir


if __name__ == "__main__":
    main(cli(Args))

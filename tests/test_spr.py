"""Tests for algos/spr.py: the checks of spec §9 on hand-made tensors and synthetic replays, the replay's
frame stacks against the real env, PER, and a subprocess smoke run with resume on a real Atari game."""

import copy
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from algos.spr import (
    Args,
    PrioritizedReplay,
    SPRNetwork,
    augment,
    c51_projection,
    compute_losses,
    ema_,
    n_step_returns,
    renormalize,
    spr_loss,
    update,
)
from shared.atari import make_env

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def filled_replay(n=60, n_actions=4, dones=(), horizon=10):
    """Frame i is constant (i % 251), a_i = i mod A, reward 1 every third step."""
    replay = PrioritizedReplay(n, horizon=horizon, alpha=0.5, seed=0)
    for i in range(n):
        replay.add(np.full((84, 84), i % 251, np.uint8), i % n_actions, float(i % 3 == 0), i in dones)
    return replay


def only(replay, t):
    """Give every item priority 0 except item t, so that every sample starts at t."""
    replay._set(np.arange(replay.cap), 0.0)
    replay._set([t], 1.0)


def nets(n_actions=4, **kw):
    torch.manual_seed(0)
    args = Args(**kw)
    net = SPRNetwork(n_actions, args)
    return args, net, copy.deepcopy(net).requires_grad_(False), copy.deepcopy(net).requires_grad_(False)


def torch_batch(batch):
    return {k: torch.as_tensor(v) for k, v in batch.items() if k != "idx"}


# ---- §9.1 augmentation, §9.6 R(x)


def test_augment_shape_shared_shift_bounded_and_fresh_draws():
    torch.manual_seed(0)
    img = torch.zeros(64, 1, 84, 84)
    img[:, :, 40, 40] = 1.0  # one bright pixel
    out = augment(img.expand(64, 4, 84, 84).contiguous())
    assert out.shape == (64, 4, 84, 84)
    assert torch.equal(out[:, :1].expand_as(out), out)  # the 4 frames of a sample move together
    pos = out[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 84 - 40, pos % 84 - 40
    assert dy.abs().max() <= 4 and dx.abs().max() <= 4 and len(set(zip(dy.tolist(), dx.tolist()))) > 10
    flat = augment(torch.ones(64, 4, 84, 84))  # replicate padding: constant images stay constant
    factor = flat[:, 0, 0, 0]
    assert torch.allclose(flat, factor.view(-1, 1, 1, 1).expand_as(flat))
    assert factor.min() >= 0.9 and factor.max() <= 1.1 and factor.std() > 0.01
    assert not torch.equal(augment(torch.ones(64, 4, 84, 84)), flat)  # new randomness every call


def test_renormalize_per_sample_min_zero_max_one():
    z = renormalize(torch.randn(5, 64, 7, 7) * torch.arange(1, 6).view(5, 1, 1, 1) + 3)
    assert torch.allclose(z.flatten(1).min(1).values, torch.zeros(5))
    assert torch.allclose(z.flatten(1).max(1).values, torch.ones(5))


# ---- §9.2 target branch and tau


def test_target_branch_gets_no_gradient_and_follows_tau_rule():
    args, net, q_target, spr_target = nets()
    assert Args().tau == 0.0 and Args(augmentation=False).tau == 0.99  # paper convention (spec §8)
    assert Args(tau=0.5).tau == 0.5
    out = compute_losses(net, q_target, spr_target, torch_batch(filled_replay().sample(4, 0.4, 5, 10, 0.99)), args)
    out["loss"].backward()
    for target in (q_target, spr_target):
        assert all(not p.requires_grad and p.grad is None for p in target.parameters())
    assert net.encoder[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in spr_target.encoder.parameters()]
    ema_(spr_target.encoder, net.encoder, 0.99)
    for p_m, p_old, p_o in zip(spr_target.encoder.parameters(), old, net.encoder.parameters()):
        assert torch.allclose(p_m, 0.99 * p_old + 0.01 * p_o)
    ema_(spr_target.encoder, net.encoder, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(spr_target.encoder.parameters(), net.encoder.parameters()))


def test_update_moves_the_target_encoder_and_projection_by_tau():
    """Through `update()`: theta_m <- tau theta_m + (1 - tau) theta_o with the online weights from before
    the step, for tau = 0 (the augmented default: a copy) and an EMA (fails if 1 - tau is passed)."""
    for tau in (0.0, 0.7):
        args, net, q_target, spr_target = nets(tau=tau, batch_size=4)
        with torch.no_grad():
            for p in spr_target.parameters():
                p.add_(torch.randn_like(p))  # target != online
        old = {k: v.clone() for k, v in spr_target.named_parameters()}
        online = {k: v.clone() for k, v in net.named_parameters()}
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        update(net, q_target, spr_target, opt, filled_replay(), args, 0.4, compute_losses, 0)
        moved = [k for k in old if k.startswith(("encoder.", "head."))]
        assert len(moved) > 10 and not torch.equal(net.encoder[0].weight, online["encoder.0.weight"])
        for k, p in spr_target.named_parameters():
            expected = tau * old[k] + (1 - tau) * online[k] if k in moved else old[k]  # h, q: not used as targets
            torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6, msg=f"tau {tau}: {k}")


def test_update_bootstraps_the_c51_target_with_gamma_to_the_n():
    """Through `update()`: with the Q heads' weights zeroed, the online pmf is softmax(z_j) for every input
    and action and the target net puts its mass on V_max, so td = logsumexp(z) - E_m[z] and the projected
    target must have mean E_m[z] = G + gamma^n V_max (gamma^(n-1) would give 0.39 more here)."""
    A, t, n, gamma = 4, 20, 10, 0.9
    replay = filled_replay(60, A)  # reward 1 every third step, no done
    only(replay, t)
    args, net, q_target, spr_target = nets(A, spr=False, augmentation=False, gamma=gamma, n_step=n, batch_size=4)
    for model, logits in ((net, net.support), (q_target, 100.0 * (net.support == 10).float())):
        with torch.no_grad():
            for layer in (model.head.value1, model.head.value2, model.head.adv1, model.head.adv2):
                for p in layer.parameters():
                    p.zero_()
            model.head.value2.bias_mu.copy_(logits)
    out = update(net, q_target, spr_target, torch.optim.SGD(net.parameters(), lr=0.0), replay, args, 0.4,
                 compute_losses, 0)
    G = sum(gamma ** i * replay.rewards[t + i] for i in range(n))
    mean_target = torch.logsumexp(net.support, 0).item() - out["train/td_loss"]
    assert mean_target == pytest.approx(G + gamma ** n * 10.0, abs=1e-3)


# ---- §9.3 rollout alignment


def test_rollout_step_k_uses_a_t_plus_k_minus_1_and_targets_o_t_plus_k():
    A, t, K = 4, 20, 5
    replay = filled_replay(60, A)
    only(replay, t)
    batch = replay.sample(3, 0.4, jumps=K, n_step=10, gamma=0.99)
    assert (batch["idx"] == t).all()
    assert all((batch["obs"][:, k, -1] == t + k).all() for k in range(K + 1))  # o_t..o_{t+K}
    assert all((batch["actions"][:, k - 1] == (t + k - 1) % A).all() for k in range(1, K + 1))
    assert (batch["next_obs"][:, -1] == t + 10).all()  # o_{t+n}

    args, net, q_target, spr_target = nets(A, augmentation=False)  # no aug: pixel values readable
    seen_actions, online_inputs, target_inputs = [], [], []
    forward = net.transition.forward
    net.transition.forward = lambda z, a: (seen_actions.append(a.clone()), forward(z, a))[1]
    net.encoder.register_forward_pre_hook(lambda m, x: online_inputs.append(x[0][:, -1, 0, 0] * 255))
    spr_target.encoder.register_forward_pre_hook(lambda m, x: target_inputs.append(x[0][:, -1, 0, 0] * 255))
    compute_losses(net, q_target, spr_target, torch_batch(batch), args)
    assert [a.tolist() for a in seen_actions] == [[(t + k - 1) % A] * 3 for k in range(1, K + 1)]
    assert torch.allclose(online_inputs[0], torch.full((3,), float(t)))  # z_t from o_t
    targets = target_inputs[0].view(3, K)  # prediction k is compared with o_{t+k}
    assert torch.allclose(targets, (t + torch.arange(1, K + 1).float()).expand(3, K))


# ---- §9.4 SPR loss, §9.5 mask


def test_spr_loss_is_two_minus_two_cos_zero_for_identical_and_scale_invariant():
    torch.manual_seed(0)
    a, b, ones = torch.randn(6, 1, 512), torch.randn(6, 1, 512), torch.ones(6, 1)
    assert torch.allclose(spr_loss(a, b, ones), 2 - 2 * F.cosine_similarity(a, b, dim=-1)[:, 0], atol=1e-5)
    assert torch.allclose(spr_loss(a, a, ones), torch.zeros(6), atol=1e-6)
    assert torch.allclose(spr_loss(3 * a, 0.5 * b, ones), spr_loss(a, b, ones), atol=1e-5)
    assert torch.allclose(spr_loss(a, -a, ones), torch.full((6,), 4.0), atol=1e-5)


def test_sequence_crossing_a_done_masks_later_steps():
    t = 20
    replay = filled_replay(60, dones={t + 2})  # the episode ends with a_{t+2}: o_{t+3} starts a new one
    only(replay, t)
    batch = replay.sample(2, 0.4, jumps=5, n_step=10, gamma=0.99)
    assert batch["spr_mask"].tolist() == [[1, 1, 0, 0, 0]] * 2  # o_{t+1}, o_{t+2} kept; o_{t+3..t+5} masked
    assert batch["dones"].tolist() == [1, 1] and batch["returns"].tolist() == pytest.approx([0.99 ** 1] * 2)
    assert (batch["obs"][:, 3, :3] == 0).all() and (batch["obs"][:, 3, 3] == t + 3).all()  # fresh stack
    torch.manual_seed(0)
    pred, target, mask = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.as_tensor(batch["spr_mask"])
    changed = target.clone()
    changed[:, 3:] = torch.randn(2, 2, 8)
    assert torch.equal(spr_loss(pred, target, mask), spr_loss(pred, changed, mask))
    assert (spr_loss(pred, target, torch.zeros(2, 5)) == 0).all()


# ---- §9.7 C51 projection, §9.8 n-step returns


def test_c51_projection_hand_cases():
    support = torch.linspace(-10, 10, 51)
    p = torch.softmax(torch.randn(7, 51), -1)
    m = c51_projection(p, torch.randn(7) * 3, (torch.rand(7) < 0.5).float(), 0.99 ** 10, support)
    assert torch.allclose(m.sum(-1), torch.ones(7), atol=1e-6)
    m = c51_projection(p[:2], torch.tensor([0.2, 15.0]), torch.ones(2), 0.9, support)  # d = 1: all at clip(G)
    assert m[0, 25].item() == pytest.approx(0.5, abs=1e-5) and m[0, 26].item() == pytest.approx(0.5, abs=1e-5)
    assert m[1, 50].item() == pytest.approx(1.0)  # clipped to V_max
    assert torch.allclose(c51_projection(p, torch.zeros(7), torch.zeros(7), 1.0, support), p, atol=1e-6)
    shifted = c51_projection(p[:1], torch.tensor([0.4]), torch.zeros(1), 1.0, support)  # one atom right
    assert torch.allclose(shifted[0, 1:50], p[0, :49], atol=1e-6)
    assert shifted[0, 50].item() == pytest.approx((p[0, 49] + p[0, 50]).item(), abs=1e-6)


def test_n_step_returns_match_brute_force_at_terminals():
    rng = np.random.default_rng(0)
    rewards, dones = rng.choice([-1.0, 0.0, 1.0], size=(200, 10)), rng.random((200, 10)) < 0.15
    G, d = n_step_returns(rewards, dones.astype(np.float32), 0.99)
    for b in range(200):
        g, ended = 0.0, False
        for i in range(10):
            g += 0.99 ** i * rewards[b, i]
            if dones[b, i]:
                ended = True
                break
        assert G[b] == pytest.approx(g, abs=1e-5) and d[b] == float(ended)


# ---- §9.10 gradient flow, deterministic eval Q


def test_spr_gradients_reach_encoder_transition_predictor_and_first_q_layers_only():
    args, net, q_target, spr_target = nets()
    batch = torch_batch(filled_replay().sample(4, 0.4, 5, 10, 0.99))
    compute_losses(net, q_target, spr_target, batch, args)["spr"].mean().backward()
    h = net.head
    for p in (net.encoder[0].weight, net.encoder[4].weight, net.transition.conv1.weight, net.transition.conv2.weight,
              net.predictor.weight, h.value1.weight_mu, h.adv1.weight_mu, h.value1.bias_mu):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in (h.value2.weight_mu, h.adv2.weight_mu, h.adv_bias, h.value1.weight_sigma, h.adv1.weight_sigma):
        assert p.grad is None  # Q output layers untouched; projection runs with noise off
    net.zero_grad(set_to_none=True)
    compute_losses(net, q_target, spr_target, batch, args.__class__(spr=False))["loss"].backward()
    assert net.transition.conv1.weight.grad is None and net.predictor.weight.grad is None  # --no-spr: DER
    assert h.value2.weight_mu.grad.abs().sum() > 0


def test_eval_q_is_deterministic_and_training_q_is_noisy():
    _, net, _, _ = nets()
    obs = torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8)
    q0, qn0 = net.q_values(obs, noise=False), net.q_values(obs)
    net.head.reset_noise()
    assert torch.equal(q0, net.q_values(obs, noise=False)) and not torch.equal(qn0, net.q_values(obs))


# ---- replay: stacks vs the real env, PER


def test_replay_frame_stacks_equal_env_stacks_across_life_losses():
    env, rng = make_env("BreakoutNoFrameskip-v4", seed=5), np.random.default_rng(5)
    obs, _ = env.reset(seed=5)
    replay, small, seen, losses = PrioritizedReplay(700, 10, 0.5, 0), PrioritizedReplay(500, 10, 0.5, 0), [], 0
    for _ in range(700):
        action = int(rng.integers(env.action_space.n))
        next_obs, reward, term, trunc, info = env.step(action)
        seen.append(obs)
        for r in (replay, small):
            r.add(obs[-1], action, float(np.sign(reward)), term or trunc)
        losses += info["life_loss"]
        obs = env.reset()[0] if term or trunc else next_obs
    assert losses >= 2
    assert np.array_equal(replay.stacks(np.arange(700)), np.stack(seen))
    kept = np.arange(203, 700)  # wrapped buffer: all but the 3 oldest items still have their history
    assert np.array_equal(small.stacks(kept % 500), np.stack(seen)[kept])
    assert (small.tree[small.leaves + np.arange(199, 203)] == 0).all()  # newest + the 3 with overwritten history


def test_per_samples_in_proportion_to_priority_alpha_with_normalised_weights():
    replay = filled_replay(40)
    assert replay.tree[replay.leaves + 29] == 1.0 and replay.tree[replay.leaves + 30] == 0.0  # last 10 invalid
    replay._set(np.arange(40), 0.0)
    replay.update_priorities(np.array([5, 9]), np.array([9.0, 1.0]))  # alpha 0.5 -> 3 : 1
    idx = np.concatenate([replay.sample(100, 0.4, 5, 10, 0.99)["idx"] for _ in range(20)])
    assert set(idx) == {5, 9} and abs((idx == 5).mean() - 0.75) < 0.05
    b = replay.sample(100, 0.4, 5, 10, 0.99)
    assert b["weights"][b["idx"] == 9] == pytest.approx(1.0) and b["weights"][b["idx"] == 5] == pytest.approx(3 ** -0.4)


# ---- smoke: a real game as a subprocess, checkpoint, resume


def run_spr(*flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "algos" / "spr.py"), *flags], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_smoke_run_writes_metrics_and_checkpoint_and_resume_continues(tmp_path):
    common = ["--env-id", "BreakoutNoFrameskip-v4", "--learning-starts", "240", "--batch-size", "8",
              "--eval-episodes", "1", "--max-episode-frames", "2000", "--log-every", "20", "--checkpoint-every", "100"]
    proc = run_spr(*common, "--total-steps", "280", "--output-dir", str(tmp_path), "--track")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("spr__Breakout__1__")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in lines if "spr/loss" in x]
    assert losses and all(np.isfinite(x["spr/loss"]) and np.isfinite(x["train/td_loss"]) for x in losses)
    assert losses[-1]["step"] == 280 and losses[-1]["perf/updates"] == 80 and losses[-1]["spr/loss"] > 0
    # PER beta follows the official schedule, 0.4 -> 1 from learning start to step 100k, not to --total-steps
    assert losses[-1]["train/per_beta"] == pytest.approx(0.4 + 0.6 * (279 - 240) / (100_000 - 240))
    assert any("train/episodic_return" in x for x in lines) and "eval/return_mean" in lines[-1]
    assert list(run_dir.glob("events.out.tfevents.*"))  # --track: TensorBoard
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 280 and state["n_updates"] == 80
    assert torch.load(run_dir / "checkpoint" / "replay.pt", weights_only=False)["t"] == 280

    proc = run_spr(*common, "--total-steps", "320", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "at step 280 (280 transitions" in proc.stdout
    new = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][len(lines):]
    perf = [x for x in new if "perf/updates" in x]
    assert [x["step"] for x in perf] == [300, 320] and perf[-1]["perf/updates"] == 160  # no restart at 0
    state = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 320 and state["n_updates"] == 160
    replay = torch.load(run_dir / "checkpoint" / "replay.pt", weights_only=False)
    assert replay["t"] == 320 and replay["dones"][279]  # buffer kept; the cut game is marked done


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_that_resume_continues_from(tmp_path):
    flags = ["--env-id", "PongNoFrameskip-v4", "--learning-starts", "100000", "--eval-episodes", "0",
             "--log-every", "50", "--total-steps", "100000", "--buffer-size", "5000", "--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "algos" / "spr.py"), *flags], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/metrics.jsonl")) or not list(tmp_path.glob("*/metrics.jsonl"))[0].read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "interrupted: checkpoint at step" in out, err[-2000:]
    (run_dir,) = tmp_path.iterdir()
    step = torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert step >= 50
    proc = run_spr("--env-id", "PongNoFrameskip-v4", "--learning-starts", "100000", "--eval-episodes", "0",
                   "--buffer-size", "5000", "--total-steps", str(step + 10), "--resume", str(run_dir))
    assert proc.returncode == 0 and f"at step {step} " in proc.stdout, proc.stderr[-2000:]
    assert torch.load(run_dir / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == step + 10

"""GRPO: the spec's hand-computed numbers (T1–T9 of papers/grpo.md §8), aggregation identities,
and subprocess smoke runs (single process, resume, two processes under torchrun)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.grpo import grpo_loss, group_advantages, mixed_groups, soft_overlong_penalty
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- T1 advantages
def test_advantages_unbiased_population_and_dr_grpo():
    r = torch.tensor([1.0, 0, 0, 0])
    assert torch.allclose(group_advantages(r, 4, "unbiased", 0.0), torch.tensor([1.5, -0.5, -0.5, -0.5]))
    with_delta = group_advantages(r, 4, "unbiased", 1e-4)
    assert with_delta[0].item() == pytest.approx(0.75 / 0.5001, abs=1e-7)  # 1.49970...
    assert with_delta[1].item() == pytest.approx(-0.25 / 0.5001, abs=1e-7)  # −0.49990...
    pop = group_advantages(r, 4, "population", 0.0)
    assert torch.allclose(pop, torch.tensor([1.7320508, -0.5773503, -0.5773503, -0.5773503]), atol=1e-6)
    assert torch.allclose(group_advantages(r, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25]))

    r2 = torch.tensor([1.0, 0, 0, 1])
    assert torch.allclose(group_advantages(r2, 4, "unbiased", 0.0), torch.tensor([1, -1, -1, 1]) * 0.8660254, atol=1e-6)
    assert torch.allclose(group_advantages(r2, 4, "population", 0.0), torch.tensor([1.0, -1, -1, 1]), atol=1e-6)

    same = group_advantages(torch.ones(4), 4, "unbiased", 1e-4)
    assert torch.equal(same, torch.zeros(4))


def test_advantages_are_per_group():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(r, 4, "unbiased", 0.0)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert torch.equal(adv[4:], torch.zeros(4))


# ---------------------------------------------------------------- T2 clipping
@pytest.mark.parametrize("adv,rho,value,dvalue", [
    (1.0, 1.5, 1.28, 0.0), (1.0, 0.5, 0.5, 1.0), (-1.0, 0.5, -0.8, 0.0), (-1.0, 1.5, -1.5, -1.0)])
def test_clipped_surrogate_value_and_slope(adv, rho, value, dvalue):
    logp = torch.tensor([[math.log(rho)]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([adv]),
                            torch.ones(1, 1), eps_low=0.2, eps_high=0.28, loss_type="token_mean")
    loss.backward()
    assert -loss.item() == pytest.approx(value, abs=1e-9)  # loss = −s
    assert -logp.grad.item() / rho == pytest.approx(dvalue, abs=1e-9)  # ∂s/∂ρ = −∂loss/∂logp / ρ
    assert stats["clip_frac"].item() == (1.0 if dvalue == 0.0 else 0.0)


# ---------------------------------------------------------------- T3 / T9 k3 KL
def test_k3_value_and_gradient():
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]], dtype=torch.float64)
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 1), beta=0.04,
                            loss_type="token_mean")
    assert stats["kl"].item() == pytest.approx(0.1931472, abs=1e-7)
    assert loss.item() == pytest.approx(0.0077259, abs=1e-7)
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.04 * 0.5, abs=1e-9)

    # T9: β = 1, Â = 0 ⇒ ∂loss/∂ℓ_θ = 1 − π_ref/π_θ = +0.5, so descent lowers π_θ towards π_ref
    logp.grad = None
    loss, _ = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 1), beta=1.0, loss_type="token_mean")
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.5, abs=1e-9)

    same = torch.tensor([[math.log(0.3)]], dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(same, same.detach(), same.detach().clone(), torch.zeros(1), torch.ones(1, 1), beta=0.04)
    loss.backward()
    assert stats["kl"].item() == 0.0 and same.grad.item() == 0.0


def test_k3_is_nonnegative():
    """The loss's own per-token KL (one token per call, Â = 0, β = 1): never negative, 0 only at π_ref = π_θ."""
    gen = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(256, generator=gen) * 5, -torch.rand(256, generator=gen) * 5
    ref[:8] = logp[:8]
    kls = [grpo_loss(a.view(1, 1), a.view(1, 1), b.view(1, 1), torch.zeros(1), torch.ones(1, 1), beta=1.0)[1]["kl"].item()
           for a, b in zip(logp, ref)]
    assert all(k >= 0 for k in kls) and kls[:8] == [0.0] * 8 and min(kls[8:]) > 0


# ---------------------------------------------------------------- T4 aggregation
def _batch(adv, lengths, T=4):
    mask = torch.zeros(len(lengths), T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = torch.zeros(len(lengths), T, requires_grad=True)
    return logp, torch.tensor(adv), mask


@pytest.mark.parametrize("loss_type,adv,expected", [
    ("seq_mean_token_mean", [1.5, -0.5, -0.5, -0.5], 0.0),
    ("token_mean", [1.5, -0.5, -0.5, -0.5], 0.25),
    ("constant", [0.75, -0.25, -0.25, -0.25], 0.0625)])
def test_aggregation_values(loss_type, adv, expected):
    logp, a, mask = _batch(adv, [1, 2, 3, 2])
    loss, _ = grpo_loss(logp, logp.detach(), None, a, mask, loss_type=loss_type, max_len=4)
    assert loss.item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("loss_type", ["seq_mean_token_mean", "token_mean", "constant"])
def test_micro_batches_with_global_normalisers_sum_to_the_full_loss(loss_type):
    gen = torch.Generator().manual_seed(1)
    logp, old = -torch.rand(6, 5, generator=gen), -torch.rand(6, 5, generator=gen)
    adv, mask = torch.randn(6, generator=gen), (torch.rand(6, 5, generator=gen) > 0.3).float()
    kw = dict(loss_type=loss_type, max_len=5, eps_low=0.2, eps_high=0.28)
    full, _ = grpo_loss(logp, old, None, adv, mask, **kw)
    parts = sum(grpo_loss(logp[r], old[r], None, adv[r], mask[r], num_seqs=6, num_tokens=mask.sum(), **kw)[0]
                for r in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


# ---------------------------------------------------------------- T5 / T6 on-policy gradient
def _toy_policy(seed=0):
    """A softmax policy over 5 tokens whose logits depend on the position: enough for autograd."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (4, 3), generator=gen)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    return W, tokens, mask


def _logp(W, tokens):
    return torch.log_softmax(W, dim=-1).gather(1, tokens.T).T  # [4, 3]


@pytest.mark.parametrize("loss_type", ["seq_mean_token_mean", "token_mean", "constant"])
def test_on_policy_gradient_is_reinforce_with_baseline(loss_type):
    W, tokens, mask = _toy_policy()
    adv = torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64)
    grads = []
    for eps in (0.2, 0.01):  # on-policy the clip range must not matter
        W.grad = None
        logp = _logp(W, tokens)
        loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask, eps_low=eps, eps_high=eps,
                            loss_type=loss_type, max_len=3)
        loss.backward()
        grads.append(W.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-12)
    lengths = mask.sum(1)
    w = {"seq_mean_token_mean": 1 / (4 * lengths), "token_mean": torch.full((4,), 1 / lengths.sum().item()),
         "constant": torch.full((4,), 1 / (4 * 3.0))}[loss_type]
    W.grad = None
    manual = (w.unsqueeze(1) * -adv.unsqueeze(1) * _logp(W, tokens) * mask).sum()
    manual.backward()
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[0], W.grad, atol=1e-12)


def test_zero_gradient_when_every_group_is_uniform():
    W, tokens, mask = _toy_policy()
    adv = group_advantages(torch.tensor([1.0, 1, 0, 0]), 2, "unbiased")
    logp = _logp(W, tokens)
    loss, _ = grpo_loss(logp, logp.detach(), None, adv, mask)
    loss.backward()
    assert torch.count_nonzero(W.grad) == 0


def test_gradient_nonzero_at_ratio_one():
    W, tokens, mask = _toy_policy()
    logp = _logp(W, tokens)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, -1, 1, -1], dtype=torch.float64), mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # value 0 at ρ = 1 ...
    loss.backward()
    assert W.grad.abs().max() > 1e-3  # ... but the gradient flows through the numerator of ρ


# ---------------------------------------------------------------- T7 / T8 DAPO pieces
def test_dynamic_sampling_keeps_only_mixed_groups():
    correct = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0])
    assert mixed_groups(correct, 4).tolist() == [False, False, True]


def test_soft_overlong_punishment():
    pen = soft_overlong_penalty(torch.tensor([10, 16, 18, 20, 21]), max_len=20, cache=4)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))


# ---------------------------------------------------------------- presets
def test_presets_symmetric_clip_follows_epsilon_and_dapo_uses_signed_rewards():
    from algos.grpo import Args, resolve_variant

    assert resolve_variant(Args(variant="grpo", epsilon=0.1)).epsilon_high == 0.1  # [0.9, 1.1], not [0.9, 1.2]
    assert resolve_variant(Args(variant="dr_grpo", epsilon=0.1, epsilon_high=0.3)).epsilon_high == 0.3
    dapo = resolve_variant(Args(variant="dapo"))
    assert (dapo.epsilon, dapo.epsilon_high, dapo.reward, dapo.overlong) == (0.2, 0.28, "signed", "soft")
    assert resolve_variant(Args(variant="dapo", reward="binary")).reward == "binary"  # a given flag wins


def test_dapo_overlong_penalty_is_half_the_correctness_gap():
    """DAPO adds Eq. 13 (down to −1) to a ±1 reward: a correct answer at the length limit scores 0, midway
    between right (1) and wrong (−1). On a 0/1 scale the same penalty would count double."""
    from algos.grpo import Args, correctness_reward, resolve_variant

    correct, lengths = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([10, 20, 10])
    reward = correctness_reward(correct, resolve_variant(Args(variant="dapo")).reward)
    assert (reward + soft_overlong_penalty(lengths, max_len=20, cache=4)).tolist() == [1.0, 0.0, -1.0]
    assert correctness_reward(correct, resolve_variant(Args(variant="grpo")).reward).tolist() == [1.0, 1.0, 0.0]


# ---------------------------------------------------------------- smoke runs (subprocess)
TINY = ["--model", "tiny", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "8",
        "--n-train", "64", "--n-test", "8", "--eval-every", "1", "--save-every", "1"]


def _run(args, tmp_path, cmd=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = cmd or [sys.executable, str(ROOT / "algos" / "grpo.py")]
    out = subprocess.run(cmd + args + ["--output-dir", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["grpo", "dapo"])
def test_smoke_writes_metrics_and_checkpoint(tmp_path, variant):
    _run(TINY + ["--total-steps", "2", "--variant", variant], tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("train/reward", "train/accuracy", "train/format_rate", "train/kl", "grpo/clip_frac",
                "grpo/zero_std_frac", "train/completion_len", "perf/tokens_per_s", "perf/gen_s", "perf/update_s"):
        assert key in train[0] and math.isfinite(train[0][key])
    assert sum("eval/accuracy" in r for r in rows) == 3  # before, after step 1, after step 2
    ckpt = run / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["optimizer"]["state"]  # Adam moments were written
    saved = json.loads((run / "args.json").read_text())
    assert saved["variant"] == variant and saved["algo"] == "grpo"
    # args.json records what ran: the variant's presets, not the None they started as
    expected = {"grpo": dict(beta=0.04, epsilon_high=0.2, loss_type="seq_mean_token_mean", reward="binary"),
                "dapo": dict(beta=0.0, epsilon_high=0.28, loss_type="token_mean", reward="signed")}[variant]
    assert {k: saved[k] for k in expected} == expected


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(TINY + ["--total-steps", "3"], straight)
    _run(TINY + ["--total-steps", "1"], split)
    run = only_run(split)
    _run(["--resume", str(run), "--total-steps", "3"], split)
    a, b = only_run(straight) / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert sa["step"] == sb["step"] == 3 and sa["cursor"] == sb["cursor"]
    for k in sa["optimizer"]["state"]:
        assert torch.equal(sa["optimizer"]["state"][k]["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [1, 2, 3]  # the resumed run appended steps 2 and 3 to the same metrics file


WORKER = """
import sys, hashlib, torch
sys.path.insert(0, {root!r})
from algos.grpo import Args, main
import tyro
out = main(tyro.cli(Args))
from accelerate import PartialState
h = hashlib.sha256()
for name, p in sorted(out["policy"].state_dict().items()):
    h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
open({out!r} + f"/rank{{PartialState().process_index}}.txt", "w").write(h.hexdigest())
"""


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(worker)]
    _run(TINY + ["--total-steps", "2"], tmp_path / "runs", cmd=cmd)
    h0, h1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert h0 == h1
    rows = read_metrics(only_run(tmp_path / "runs"))
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # logged once, by the main process


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "algos" / "grpo.py")] + TINY[:-4] + [
        "--total-steps", "500", "--eval-every", "1000", "--save-every", "1000", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until at least one training step is logged
        runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
        if runs and any("train/loss" in r for r in read_metrics(runs[0])):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after step" in out, out[-2000:]
    run = only_run(tmp_path)
    step = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    logged = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert step >= 1 and logged[-1] == step  # nothing logged was lost
    _run(["--resume", str(run), "--total-steps", str(step + 1)], tmp_path)
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step + 1


# ---------------------------------------------------------------- --token-budget (tests/test_nft.py, test_score.py reuse these)
def strip_perf(rows):
    """The metrics of a run without its timings (perf/*) and time stamps: what a budget that is never reached
    must leave unchanged."""
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def check_budget_stop(run, budget, step_tokens, total_steps, eval_key="eval/accuracy"):
    """A run that --token-budget ended. `step_tokens[k]`: tokens generated for training in step k + 1 (from its
    train metrics). Every evaluation record logs exactly the training tokens so far (evaluation does not count),
    the budget was short before the last step and spent by it (the overshoot is one step's generation), the run
    stopped before `total_steps`, and its final model was evaluated and checkpointed at the last step."""
    import itertools

    spent, last = [0, *itertools.accumulate(step_tokens)], len(step_tokens)
    evals = [r for r in read_metrics(run) if eval_key in r]
    assert [r["perf/gen_tokens"] for r in evals] == [spent[r["step"]] for r in evals] and evals[0]["step"] == 0
    assert last < total_steps and spent[last - 1] < budget <= spent[last] and evals[-1]["step"] == last
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == last


BUDGET = TINY[:-4] + ["--eval-every", "2", "--save-every", "1000", "--total-steps", "50"]  # 8 answers ≤ 8 tokens a step


@pytest.mark.slow
def test_token_budget_ends_the_run_after_the_step_that_spends_it(tmp_path):
    _run(BUDGET + ["--token-budget", "150"], tmp_path)
    run = only_run(tmp_path)
    train = [r for r in read_metrics(run) if "train/loss" in r]
    check_budget_stop(run, 150, [round(r["train/completion_len"] * 8) for r in train], 50)
    assert len(train) == 3  # the tiny model writes 8 tokens an answer: 64, 128 < 150 <= 192; evaluated at 0, 2, 3


@pytest.mark.slow
def test_token_budget_counts_dapo_regenerations(tmp_path):
    """DAPO's dynamic sampling re-generates within a step: every generation batch counts (the tiny model's
    groups are all wrong, so its one step runs --max-gen-batches = 3 batches of 8 answers of at most 8 tokens)."""
    _run(BUDGET + ["--variant", "dapo", "--max-gen-batches", "3", "--token-budget", "100"], tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    assert [r["grpo/gen_batches"] for r in rows if "train/loss" in r] == [3]
    assert [(r["step"], 2 * 64 < r["perf/gen_tokens"] <= 3 * 64) for r in rows if "eval/accuracy" in r][1:] == [(1, True)]


@pytest.mark.slow
def test_token_budget_never_reached_changes_nothing(tmp_path):
    _run(TINY + ["--total-steps", "2"], tmp_path / "plain")
    _run(TINY + ["--total-steps", "2", "--token-budget", "1000000"], tmp_path / "budget")
    plain, budget = (strip_perf(read_metrics(only_run(tmp_path / p))) for p in ("plain", "budget"))
    assert [r["step"] for r in plain if "train/loss" in r] == [1, 2] and plain == budget

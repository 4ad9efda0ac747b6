"""NFT: the spec's numbers (N1–N9 of papers/nft.md §9), the straight-through clip, the on-policy
equivalence with `algos/grpo.py` on a tiny model, and a subprocess smoke run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.grpo import group_advantages, grpo_loss
from algos.nft import group_rate, informative_groups, negative_ratio, nft_loss, prompt_weights, straight_through_max
from tests.helpers import only_run, read_metrics
from tests.test_grpo import check_budget_stop, strip_perf

ROOT = Path(__file__).resolve().parents[1]


def _one_token(R, correct, rhat=0.25, omega=0.75, eps=1.0, neg_weight=1.0):
    """Loss value and ∂L/∂ℓ_θ for a single answer token with ratio R (normaliser 1: per-token values)."""
    logp = torch.tensor([[math.log(R)]], dtype=torch.float64, requires_grad=True)
    loss, stats = nft_loss(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([float(correct)]),
                           torch.tensor([rhat]), torch.tensor([omega]), torch.ones(1, 1), eps=eps,
                           neg_weight=neg_weight, normaliser=1.0)
    loss.backward()
    return loss.item(), logp.grad.item()


# ---------------------------------------------------------------- N1 labels, r̂ and ω
def test_rate_and_prompt_weights():
    labels = (torch.tensor([1.0, -1, -1, -1]) + 1) / 2  # ±1 rewards → 0/1 labels
    rhat = group_rate(labels, 4)
    assert torch.allclose(rhat, torch.full((4,), 0.25))
    assert prompt_weights(rhat, "one_minus_r")[0].item() == pytest.approx(0.75)
    assert prompt_weights(rhat, "sqrt")[0].item() == pytest.approx(1.7320508, abs=1e-6)
    assert prompt_weights(rhat, "one")[0].item() == 1.0


# ---------------------------------------------------------------- N2 / N3 on-policy
@pytest.mark.parametrize("kind,pos,neg", [("one_minus_r", -0.75, 0.25), ("sqrt", -1.7320508, 0.5773503)])
def test_on_policy_value_zero_and_per_token_gradient(kind, pos, neg):
    omega = prompt_weights(torch.tensor([0.25]), kind).item()
    for correct, expected in ((1, pos), (0, neg)):
        value, grad = _one_token(1.0, correct, omega=omega)
        assert value == pytest.approx(0.0, abs=1e-12)
        assert grad == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- N5 / N6 off-policy tokens
@pytest.mark.parametrize("R,eps,value,grad", [
    (2.0, 1.0, 0.0, 0.5), (2.0, 0.5, 0.304099, 0.75), (5.0, 1.0, 0.0, 1.25), (0.5, 1.0, -0.115613, 0.107143)])
def test_negative_token_off_policy(R, eps, value, grad):
    v, g = _one_token(R, 0, eps=eps)
    assert math.isfinite(v) and v == pytest.approx(value, abs=1e-6)
    assert g == pytest.approx(grad, abs=1e-6)


@pytest.mark.parametrize("R,proxy", [(2.0, 0.666667), (5.0, -0.333333), (0.5, 1.166667)])
def test_negative_proxy_values(R, proxy):
    """N5's proxy (1 − r̂R)/(1 − r̂) at r̂ = 0.25, and that nft_loss's negative term is −log max_v(proxy, ε)."""
    assert negative_ratio(torch.tensor(R), torch.tensor(0.25)).item() == pytest.approx(proxy, abs=1e-6)
    for eps in (0.5, 1.0):
        v, _ = _one_token(R, 0, eps=eps, omega=1.0)
        assert v == pytest.approx(-math.log(max(proxy, eps)), abs=1e-6)


@pytest.mark.parametrize("R,value", [(0.5, 0.519860), (2.0, -0.519860)])
def test_positive_token_gradient_independent_of_ratio(R, value):
    v, g = _one_token(R, 1)
    assert v == pytest.approx(value, abs=1e-6) and g == pytest.approx(-0.75, abs=1e-9)


def test_straight_through_keeps_gradient_where_plain_clamp_kills_it():
    """R = 5 > 1/r̂: the proxy is negative, its value is clamped to ε but the gradient survives."""
    x = torch.tensor([-0.5, 0.3, 2.0], requires_grad=True)
    y = straight_through_max(x, 1.0)
    assert y.tolist() == [1.0, 1.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    _, g = _one_token(5.0, 0)
    assert g != 0.0
    logp = torch.tensor([[math.log(5.0)]], requires_grad=True)  # the wrong way, for contrast
    (-torch.log(torch.clamp((1 - 0.25 * logp.exp()) / 0.75, min=1.0))).sum().backward()
    assert logp.grad.item() == 0.0


# ---------------------------------------------------------------- N7 / N8 / N9
def test_rft_gives_zero_gradient_from_negatives():
    assert _one_token(2.0, 0, neg_weight=0.0)[1] == 0.0
    assert _one_token(0.5, 0, neg_weight=0.0)[1] == 0.0


def test_filter_and_finite_extremes():
    assert informative_groups(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]), 4).tolist() == [False, False, True]
    R = torch.tensor([1e-6, 1e-3, 1.0, 3.99, 4.0, 100.0, math.exp(10)], dtype=torch.float64)
    logp = R.log().unsqueeze(0).repeat(2, 1).requires_grad_(True)
    loss, _ = nft_loss(logp, torch.zeros_like(logp), torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.25]),
                       torch.tensor([0.75, 0.75]), torch.ones_like(logp), eps=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()


def test_token_sum_aggregation_duplicating_an_answer_doubles_its_gradient():
    def grad_of(n_copies):
        logp = torch.full((n_copies, 3), math.log(0.7), dtype=torch.float64, requires_grad=True)
        loss, _ = nft_loss(logp, torch.full_like(logp, math.log(0.5)), torch.ones(n_copies),
                           torch.full((n_copies,), 0.5), torch.full((n_copies,), 0.5), torch.ones(n_copies, 3),
                           normaliser=10.0)
        loss.backward()
        return logp.grad.sum().item()
    assert grad_of(2) == pytest.approx(2 * grad_of(1), rel=1e-12)


def test_token_sum_aggregation_weighs_every_token_alike_whatever_its_answers_length():
    """N9 with answers of different lengths: a token sum over a constant gives each token of a 1-token and a
    3-token answer the same gradient; a per-answer mean (1/|a|) would give the short answer's token 3x."""
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1], [1, 1, 0]])
    for correct, R in ((1.0, 0.7 / 0.5), (0.0, 1.3)):  # a positive and a negative token
        logp = torch.full((3, 3), math.log(R), dtype=torch.float64, requires_grad=True)
        loss, _ = nft_loss(logp, torch.zeros_like(logp), torch.full((3,), correct), torch.full((3,), 0.25),
                           torch.full((3,), 0.75), mask, normaliser=10.0)
        loss.backward()
        g = logp.grad[mask.bool()]
        assert torch.allclose(g, g[0].expand_as(g)) and g[0] != 0 and (logp.grad[~mask.bool()] == 0).all()


# ---------------------------------------------------------------- N4: NFT ≡ GRPO on-policy, on a tiny model
@pytest.fixture(scope="module")
def batch():
    from shared.logprobs import token_logprobs
    from shared.models import chat_prompt, load_model
    from shared.sampling import generate

    torch.manual_seed(0)
    model, tok = load_model("tiny", device="cpu", seed=0)
    model = model.double()
    prompts = [chat_prompt(tok, f"What is {a} + {b}?") for a, b in ((12, 30), (45, 11), (70, 8))]
    ro = generate(model, tok, prompts, n=4, max_new_tokens=6, temperature=1.0)
    correct = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.float64)  # mixed groups: r̂ = 1/4, 1/2, 3/4

    def grads(loss_fn):
        model.zero_grad()
        logp = token_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
        loss_fn(logp).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return ro, correct, grads


def _nft(ro, correct, kind, loss_type="constant", normaliser=None, groups=slice(None)):
    rhat = group_rate(correct, 4)
    # "ratio": the √-less weight some summaries print, which must NOT match GRPO
    omega = (1 - rhat) / rhat if kind == "ratio" else prompt_weights(rhat, kind)
    return lambda logp: nft_loss(logp, logp.detach(), correct, rhat, omega, ro.completion_mask,
                                 loss_type=loss_type, normaliser=normaliser)[0]


def _grpo(ro, correct, std, loss_type="constant"):
    adv = group_advantages(correct, 4, std, eps=0.0).double()
    return lambda logp: grpo_loss(logp, logp.detach(), None, adv, ro.completion_mask, loss_type=loss_type,
                                  max_len=ro.completion_ids.shape[1])[0]


def test_nft_sqrt_weight_equals_grpo_population_std(batch):
    ro, correct, grads = batch
    C = ro.completion_ids.shape[0] * ro.completion_ids.shape[1]  # N · L_max, Dr. GRPO's constant
    g_nft, g_grpo = grads(_nft(ro, correct, "sqrt", normaliser=C)), grads(_grpo(ro, correct, "population"))
    assert g_grpo.abs().max() > 1e-4
    assert (g_nft - g_grpo).abs().max() < 1e-10


def test_nft_one_minus_r_weight_equals_dr_grpo(batch):
    ro, correct, grads = batch
    C = ro.completion_ids.shape[0] * ro.completion_ids.shape[1]
    g_nft, g_dr = grads(_nft(ro, correct, "one_minus_r", normaliser=C)), grads(_grpo(ro, correct, "none"))
    assert (g_nft - g_dr).abs().max() < 1e-10


def test_equivalence_holds_for_token_mean_too(batch):
    ro, correct, grads = batch
    g_nft = grads(_nft(ro, correct, "sqrt", loss_type="token_mean"))
    g_grpo = grads(_grpo(ro, correct, "population", loss_type="token_mean"))
    assert (g_nft - g_grpo).abs().max() < 1e-10


def test_unbiased_std_and_missing_square_root_give_the_predicted_ratios(batch):
    ro, correct, grads = batch
    C = ro.completion_ids.shape[0] * ro.completion_ids.shape[1]
    g_nft, g_unbiased = grads(_nft(ro, correct, "sqrt", normaliser=C)), grads(_grpo(ro, correct, "unbiased"))
    assert (g_nft - math.sqrt(4 / 3) * g_unbiased).abs().max() < 1e-7  # √(G/(G−1)) = 1.1547
    # one group r = [1,0,0,0]: ω = (1−r̂)/r̂ = 3 gives √3 × GRPO, not GRPO
    one = torch.tensor([1.0, 0, 0, 0] * 3, dtype=torch.float64)
    g_ratio, g_pop = grads(_nft(ro, one, "ratio", normaliser=C)), grads(_grpo(ro, one, "population"))
    assert (g_ratio - math.sqrt(3) * g_pop).abs().max() < 1e-7
    assert (g_ratio - g_pop).abs().max() > 1e-4


# ---------------------------------------------------------------- smoke (subprocess)
@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--rft"]])
def test_smoke_writes_metrics_and_checkpoint(tmp_path, extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "algos" / "nft.py"), "--model", "tiny", "--total-steps", "2",
           "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "8", "--n-train", "64", "--n-test", "8",
           "--max-gen-batches", "2", "--eval-every", "2", "--output-dir", str(tmp_path)] + extra
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert run.name.startswith("rft__" if extra else "nft__")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/grad_norm" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert all(math.isfinite(r["train/loss"]) and r["nft/neg_weight"] == (0.0 if extra else 1.0) for r in train)
    assert (run / "checkpoint" / "model.safetensors").exists()
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    # the default mini-batch (8 answers) splits each 8-answer rollout... here 2 groups of 4: one update
    # per rollout step; the off-policy split is tested below
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}
    args = json.loads((run / "args.json").read_text())
    assert args["algo"] == "nft" and (args["neg_weight"], args["prompt_weight"]) == ((0.0, "one") if extra else (1.0, "one_minus_r"))


@pytest.mark.slow
def test_default_rollout_is_split_into_four_off_policy_updates(tmp_path):
    """NFT's own regime (issue: with one mini-batch per rollout NFT's gradient is Dr. GRPO's): by default
    a rollout of B = 4 groups of K = 8 is trained as 4 mini-batches of one group, 4 optimizer steps."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "algos" / "nft.py"), "--model", "tiny", "--total-steps", "1",
           "--max-new-tokens", "4", "--n-train", "64", "--n-test", "4", "--n-dev", "4", "--max-gen-batches", "1",
           "--output-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}


# ---------------------------------------------------------------- --token-budget (subprocess)
NFT_TINY = ["--model", "tiny", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "8", "--n-train", "64",
            "--n-test", "8", "--max-gen-batches", "1"]  # one generation batch a step: 8 answers of ≤ 8 tokens


def _nft_run(args, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "algos" / "nft.py")] + NFT_TINY + args + ["--output-dir", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return only_run(out)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--rft"]])
def test_token_budget_ends_the_run_after_the_step_that_spends_it(tmp_path, extra):
    run = _nft_run(["--total-steps", "50", "--eval-every", "2", "--save-every", "1000", "--token-budget", "150"] + extra, tmp_path)
    train = [r for r in read_metrics(run) if "train/grad_norm" in r]
    check_budget_stop(run, 150, [round(r["train/completion_len"] * 8) for r in train], 50)
    assert len(train) == 3  # 64, 128 < 150 <= 192 tokens


@pytest.mark.slow
def test_token_budget_never_reached_changes_nothing(tmp_path):
    plain = _nft_run(["--total-steps", "2", "--eval-every", "1"], tmp_path / "plain")
    budget = _nft_run(["--total-steps", "2", "--eval-every", "1", "--token-budget", "1000000"], tmp_path / "budget")
    rows = strip_perf(read_metrics(plain))
    assert [r["step"] for r in rows if "train/grad_norm" in r] == [1, 2] and rows == strip_perf(read_metrics(budget))

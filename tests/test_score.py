"""SCoRe: the spec's §8 cases with their hand-computed numbers (papers/score.md), the identity of Stage I
with Dr. GRPO, masks of the two-turn rollout, the metric identities, and subprocess runs on the tiny model
(both stages, resume, SIGTERM, two processes, bad flags, --help)."""

import dataclasses
import importlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from algos.score import (
    ANSWER_FORMAT, P1, Args, answer_key, edit_distance, edit_ratio, k3, majority_vote, self_correction_metrics,
    shaped_turn2_reward, stage1_loss, stage2_loss, stage_of, train_reward, two_turn_rollout)
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


# ---------------------------------------------------------------- §8.1 shaped turn-2 reward (Eq. 5)
def test_shaped_turn2_reward_alpha_10():
    r1, r2 = torch.tensor([0.0, 0, 1, 1]), torch.tensor([0.0, 1, 1, 0])
    assert shaped_turn2_reward(r1, r2, 10.0).tolist() == [0.0, 11.0, 1.0, -10.0]
    assert shaped_turn2_reward(r1, r2, 0.0).tolist() == r2.tolist()  # α = 0: plain r̂(y2)


def test_stage2_credits_turn1_with_the_unshaped_r1_and_turn2_with_r_tilde():
    """∂L_II/∂ℓ(y1) = −r1/N (0, 0, 1, 1: r1 is not shaped) and ∂L_II/∂ℓ(y2) = −r̃2/N (0, 11, 1, −10)."""
    r1, r2 = torch.tensor([0.0, 0, 1, 1], dtype=F64), torch.tensor([0.0, 1, 1, 0], dtype=F64)
    logp1 = torch.zeros(4, 1, dtype=F64, requires_grad=True)
    logp2 = torch.zeros(4, 1, dtype=F64, requires_grad=True)
    ones = torch.ones(4, 1)
    loss, _ = stage2_loss(logp1, None, ones, logp2, None, ones, r1, shaped_turn2_reward(r1, r2, 10.0), beta1=0.0)
    loss.backward()
    assert (-4 * logp1.grad.flatten()).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert (-4 * logp2.grad.flatten()).tolist() == [0.0, 11.0, 1.0, -10.0]


# ---------------------------------------------------------------- §8.2 γ = 0 credit
def _tokens(n=3, T=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, T, generator=gen, dtype=F64) * 3
    ref = -torch.rand(n, T, generator=gen, dtype=F64) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)[:n]
    return logp.requires_grad_(), ref, mask


def test_flipping_r2_leaves_the_turn1_coefficient_unchanged_in_stage2():
    grads = []
    for r2 in ([1.0, 0, 1], [1.0, 1, 1], [0.0, 0, 0]):
        logp1, ref1, mask1 = _tokens(seed=1)
        logp2, ref2, mask2 = _tokens(seed=2)
        r1, r2 = torch.tensor([0.0, 1, 1], dtype=F64), torch.tensor(r2, dtype=F64)
        loss, _ = stage2_loss(logp1, ref1, mask1, logp2, ref2, mask2, r1, shaped_turn2_reward(r1, r2, 10.0), beta1=0.01)
        loss.backward()
        grads.append(logp1.grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_stage1_without_kl_gives_turn1_exactly_zero_gradient():
    logp1, ref1, mask1 = _tokens(seed=1)
    logp2, ref2, mask2 = _tokens(seed=2)
    loss, _ = stage1_loss(logp1, ref1, mask1, logp2, ref2, mask2, torch.tensor([1.0, 0, 1], dtype=F64),
                          beta1=0.0, beta2=0.0)
    loss.backward()
    assert logp1.grad is not None and torch.count_nonzero(logp1.grad) == 0
    assert torch.count_nonzero(logp2.grad) > 0


def test_stage1_turn1_gradient_is_the_kl_gradient_only_whatever_the_rewards():
    """Stage I: the turn-1 tokens get gradient only through β2·K̂(y1|x1): ∂/∂ℓθ = β2·(1 − π_ref/π_θ)/N."""
    for r2 in ([1.0, 0, 1], [0.0, 0, 0]):
        logp1, ref1, mask1 = _tokens(seed=1)
        logp2, ref2, mask2 = _tokens(seed=2)
        loss, _ = stage1_loss(logp1, ref1, mask1, logp2, ref2, mask2, torch.tensor(r2, dtype=F64), beta1=0.01, beta2=0.1)
        loss.backward()
        expected = 0.1 * (1 - torch.exp(ref1 - logp1.detach())) * mask1 / 3
        assert torch.allclose(logp1.grad, expected, atol=1e-15)


# ---------------------------------------------------------------- §8.3 / §8.4 the Stage I anchor, k3
def _policy_logits(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 5, generator=gen, dtype=F64)


def _logp_of(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_stage1_anchor_moves_turn1_logits_only_when_the_policy_left_the_reference():
    tokens = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))
    ref_logits = _policy_logits(0)
    mask = torch.ones(3, 4)
    zero_r = torch.zeros(3, dtype=F64)
    y2 = torch.zeros(3, 1, dtype=F64, requires_grad=True)
    for logits, moved in ((ref_logits + 0.3 * _policy_logits(1), True), (ref_logits.clone(), False)):
        logits.requires_grad_()
        loss, stats = stage1_loss(_logp_of(logits, tokens), _logp_of(ref_logits, tokens), mask, y2, None,
                                  torch.ones(3, 1), zero_r, beta1=0.0, beta2=0.1)
        loss.backward()
        if moved:
            assert logits.grad.abs().max() > 1e-4 and stats["kl1"] > 0
        else:
            assert stats["kl1"].item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_k3_is_nonnegative_and_the_kl_term_is_a_differentiable_tensor():
    gen = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(64, 8, generator=gen) * 5, -torch.rand(64, 8, generator=gen) * 5
    assert (k3(logp, ref) >= 0).all()
    assert k3(torch.tensor(math.log(0.5)), torch.tensor(math.log(0.25))).item() == pytest.approx(0.1931472, abs=1e-7)
    logp1 = logp[:4].clone().requires_grad_()
    loss, stats = stage1_loss(logp1, ref[:4], torch.ones(4, 8), torch.zeros(4, 8), None, torch.ones(4, 8),
                              torch.zeros(4), beta1=0.0, beta2=0.1)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad and loss.item() > 0
    assert loss.item() == pytest.approx(0.1 * stats["kl1"].item())  # only the KL term is left


# ---------------------------------------------------------------- §8.8 loss sign on a toy policy
def _toy_stage1(beta2, steps=200, n=64, lr=0.5):
    """Two tokens {A, B}; B is right at turn 2. Turn-1 logits w1 + c, turn-2 logits w2 + c: the shared c lets
    turn 2's update drag turn 1 unless the β2 anchor holds it. π_ref is uniform. Returns P1(B), P2(B)."""
    gen = torch.Generator().manual_seed(0)
    w1, w2, c = (torch.zeros(2, dtype=F64, requires_grad=True) for _ in range(3))
    opt = torch.optim.SGD([w1, w2, c], lr=lr)
    ones = torch.ones(n, 1, dtype=F64)
    for _ in range(steps):
        lp1, lp2 = torch.log_softmax(w1 + c, -1), torch.log_softmax(w2 + c, -1)
        y1 = torch.multinomial(lp1.exp().detach(), n, replacement=True, generator=gen)
        y2 = torch.multinomial(lp2.exp().detach(), n, replacement=True, generator=gen)
        loss, _ = stage1_loss(lp1[y1].unsqueeze(1), ones * math.log(0.5), ones, lp2[y2].unsqueeze(1),
                              ones * math.log(0.5), ones, (y2 == 1).to(F64), beta1=0.0, beta2=beta2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(w1 + c, -1)[1].item(), torch.softmax(w2 + c, -1)[1].item()


def test_stage1_raises_the_right_turn2_token_and_the_anchor_holds_turn1():
    p1, p2 = _toy_stage1(beta2=1.0)
    assert p2 > 0.95 and abs(p1 - 0.5) < 0.05
    p1_free, p2_free = _toy_stage1(beta2=0.0)
    assert p2_free > 0.95 and abs(p1_free - 0.5) > 0.3  # without the anchor turn 1 follows the shared bias


# ---------------------------------------------------------------- identity: Stage I ≡ Dr. GRPO on turn 2
def test_stage1_with_batch_mean_baseline_is_dr_grpo_on_the_second_answers():
    """β = 0, b2 = batch mean: ∇L_I = L_max · ∇ Dr. GRPO (one group = the batch, constant normaliser N·L_max)."""
    from algos.grpo import group_advantages, grpo_loss

    W = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
    r2 = torch.tensor([1.0, 0, 0], dtype=F64)
    logp = lambda: torch.log_softmax(W, -1).gather(1, tokens.T).T  # noqa: E731
    loss, _ = stage1_loss(None, None, None, logp(), None, mask, r2, beta1=0.0, beta2=0.0, b2=r2.mean())
    loss.backward()
    ours, W.grad = W.grad.clone(), None
    lp = logp()
    dr, _ = grpo_loss(lp, lp.detach(), None, group_advantages(r2, 3, "none"), mask, loss_type="constant", max_len=4)
    dr.backward()
    assert ours.abs().max() > 1e-3 and torch.allclose(ours, 4 * W.grad, atol=1e-12)


# ---------------------------------------------------------------- §8.5 metrics
def test_metrics_on_the_spec_table_divide_by_all_n():
    m = self_correction_metrics(torch.tensor([1, 1, 0, 0, 1]), torch.tensor([1, 0, 1, 0, 1]))
    assert m == pytest.approx({"acc_t1": 0.6, "acc_t2": 0.6, "delta": 0.0, "delta_i2c": 0.2, "delta_c2i": 0.2})


def test_delta_is_i2c_minus_c2i_on_a_hand_made_table():
    c1, c2 = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0]), torch.tensor([1, 1, 1, 0, 0, 1, 1, 0])
    m = self_correction_metrics(c1, c2)  # i→c: rows 1, 2, 5; c→i: row 4
    assert m["delta_i2c"] == 3 / 8 and m["delta_c2i"] == 1 / 8 and m["delta"] == pytest.approx(2 / 8)
    assert m["delta"] == pytest.approx(m["delta_i2c"] - m["delta_c2i"]) == pytest.approx(m["acc_t2"] - m["acc_t1"])


def test_paper_base_row_identity():
    """v1 Table 3, base row: 52.6 → 41.4 gives Δ −11.2 = 4.6 − 15.8 (fractions of all 500 problems)."""
    n = 500
    c1 = torch.tensor([1] * 263 + [0] * 237)  # 52.6 %
    c2 = torch.tensor([1] * (263 - 79) + [0] * 79 + [1] * 23 + [0] * (237 - 23))  # 79 = 15.8 %, 23 = 4.6 %
    m = self_correction_metrics(c1, c2)
    assert (round(100 * m["acc_t2"], 1), round(100 * m["delta"], 1)) == (41.4, -11.2)
    assert (round(100 * m["delta_i2c"], 1), round(100 * m["delta_c2i"], 1)) == (4.6, 15.8) and len(c1) == n


def test_edit_distance_ratio_and_majority_vote():
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3 and edit_distance("ab", "ab") == 0
    assert edit_ratio("kitten", "sitting") == pytest.approx(3 / 13) and edit_ratio("", "") == 0.0
    assert answer_key("10.0") == answer_key("10") and answer_key(None) is None
    assert majority_vote(["3", None, "4", "4", "3"]) == 0  # tie: the first of the most common
    assert majority_vote(["3", "4", "4"]) == 1 and majority_vote([None, None]) is None


# ---------------------------------------------------------------- §8.7 (adapted) rewards
def test_train_reward_is_the_verifier_and_a_truncated_answer_earns_nothing():
    from shared.tasks import load_task
    from shared.sampling import Rollout

    task = load_task("multistep", n_train=1, n_test=1)
    p = task.train[0]
    texts = [p.meta["solution"], p.meta["solution"], "I cannot say.", "Answer: " + str(int(p.answer) + 1)]
    ro = Rollout(torch.zeros(4, 1), torch.ones(4, 1), torch.zeros(4, 1), torch.ones(4, 1), texts,
                 torch.tensor([False, True, False, False]))
    vs = [task.verify(t, p) for t in texts]
    assert train_reward(vs, ro).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert train_reward(vs, ro, grade_truncated=True).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_math_verifier_on_the_answer_format_p1_asks_for():
    """§8.7 adapted: for math500 p1 asks for \\boxed{} (the task's format, not MATH's "Final Answer: The final
    answer is $…$"); an equivalent boxed answer earns 1, an answer without the asked-for format earns 0."""
    from shared.verifiers import verify_math

    assert "\\boxed{}" in ANSWER_FORMAT["math500"]
    assert verify_math(r"So x = 1/3, and \boxed{\frac{1}{3}}", r"\frac13", mode="boxed").correct
    assert not verify_math(r"So x = 1/3, and the answer is \frac{1}{3}.", r"\frac13", mode="boxed").correct


def test_every_task_has_an_answer_format_and_p1_is_the_papers_words():
    from shared.tasks import TASKS

    assert set(ANSWER_FORMAT) == set(TASKS)
    assert P1.startswith("There might be an error in the solution above because of lack of understanding of the "
                         "question. Please correct the error, if any, and rewrite the solution. Only output the final solution!")
    assert not any(w in P1.lower() for w in ("wrong", "incorrect", "correct answer"))  # never reveals r̂(y1)


def test_stage_schedule_cycles():
    assert [stage_of(s, 2, 3) for s in range(10)] == [1, 1, 2, 2, 2, 1, 1, 2, 2, 2]
    assert {stage_of(s, 4, 0) for s in range(8)} == {1} and {stage_of(s, 0, 4) for s in range(8)} == {2}


# ---------------------------------------------------------------- §8.6 prompt assembly and masks
@pytest.fixture(scope="module")
def tiny():
    from shared.models import load_model

    return load_model("tiny", device="cpu", log=lambda *a: None)


def test_turn2_prompt_holds_problem_y1_and_p1_and_only_y2_is_trained(tiny):
    from shared.models import chat_prompt

    model, tok = tiny
    instruction = P1 + ANSWER_FORMAT["multistep"]
    prompts = [chat_prompt(tok, "Solve 7 - 5 + 8 step by step."), chat_prompt(tok, "Solve 2 + 3 - 1 step by step.")]
    torch.manual_seed(0)
    ro1, ro2 = two_turn_rollout(model, None, tok, prompts, instruction, max_new_tokens=10, temperature=1.0)
    for i in range(2):
        x1 = ro1.prompt_ids[i][ro1.prompt_mask[i].bool()].tolist()
        y1 = ro1.completion_ids[i][ro1.completion_mask[i].bool()].tolist()
        x2 = ro2.prompt_ids[i][ro2.prompt_mask[i].bool()].tolist()
        assert x2[:len(x1) + len(y1)] == x1 + y1  # y1 verbatim, token for token
        text1, text2 = tok.decode(x1), tok.decode(x2)
        assert instruction not in text1 and "Solve" in text1
        assert text2.count(instruction) == 1 and text2.index(instruction) > len(tok.decode(x1 + y1)) - 1
        # the loss sees only completion positions: y1 and p1 sit in ro2's prompt, never in its completion mask
        y2 = ro2.completion_ids[i][ro2.completion_mask[i].bool()].tolist()
        assert ro2.completion_mask[i].sum() == len(y2) <= 10


# ---------------------------------------------------------------- subprocess runs on the tiny model
TINY = ["--model", "tiny", "--batch-size", "4", "--max-new-tokens", "8", "--n-train", "64", "--n-test", "8",
        "--stage1-steps", "2", "--stage2-steps", "2", "--micro-batch-size", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# The random tiny model never answers right, so every reward would be 0 and nothing would train. The worker
# swaps in a toy reward (even-length answers are "right") so that both stages take real gradient steps.
WORKER = """
import sys, hashlib
sys.path.insert(0, {root!r})
import torch
import algos.score as score
from shared.args import cli
score.train_reward = lambda vs, ro, *_: torch.tensor([float(len(t) % 2 == 0) for t in ro.texts])
out = score.main(cli(score.Args))
from accelerate import PartialState
h = hashlib.sha256()
for name, p in sorted(out["policy"].state_dict().items()):
    h.update(name.encode()); h.update(p.detach().cpu().numpy().tobytes())
open({out!r} + f"/rank{{PartialState().process_index}}.txt", "w").write(h.hexdigest())
"""


def _worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    return [sys.executable, str(path)]


def _run(args, out_dir, cmd=None, timeout=300):
    cmd = cmd or [sys.executable, str(ROOT / "algos" / "score.py")]
    out = subprocess.run(cmd + args + ["--output-dir", str(out_dir)], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_both_stages_on_the_command_line(tmp_path):
    _run(TINY + ["--total-steps", "4", "--eval-every", "2", "--eval-k", "2", "--offline-frac", "0.5", "--baseline"],
         tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["score/stage"] for r in train] == [1, 1, 2, 2]
    for key in ("train/reward", "train/accuracy", "train/kl", "train/grad_norm",
                "score/acc_t1", "score/delta_i2c", "score/delta_c2i", "score/changed_frac", "perf/step_s",
                "perf/gen_s", "perf/update_s", "perf/tokens_per_s"):
        assert math.isfinite(train[0][key]), key
    evals = [r for r in rows if "eval/acc_t2" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("eval/acc_t1", "eval/delta", "eval/delta_i2c", "eval/delta_c2i", "eval/changed_frac", "eval/edit_ratio",
                "eval/maj_self_correct@2", "eval/maj_parallel_2k@2"):
        assert key in evals[-1]
    assert (run / "checkpoint" / "model.safetensors").exists()


@pytest.mark.slow
def test_both_stages_train_and_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = TINY + ["--eval-every", "10", "--save-every", "10", "--baseline"]
    _run(flags + ["--total-steps", "4"], straight, cmd=_worker(tmp_path))
    _run(flags + ["--total-steps", "1"], split, cmd=_worker(tmp_path))  # stops inside Stage I
    run = only_run(split)
    _run(["--resume", str(run), "--total-steps", "4"], split, cmd=_worker(tmp_path))
    rows = [r for r in read_metrics(only_run(straight)) if "train/loss" in r]
    assert [r["score/stage"] for r in rows] == [1, 1, 2, 2] and all(r["train/grad_norm"] > 0 for r in rows)
    assert rows[-1]["train/kl"] > 0  # the policy has left π_ref
    a, b = only_run(straight) / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert sa["step"] == sb["step"] == 4 and sa["cursor"] == sb["cursor"]
    for k in sa["optimizer"]["state"]:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["optimizer"]["state"][k][moment], sb["optimizer"]["state"][k][moment])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           _worker(tmp_path)[1]]
    _run(TINY + ["--total-steps", "4", "--eval-every", "10", "--baseline"], tmp_path / "runs", cmd=cmd)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    rows = [r for r in read_metrics(only_run(tmp_path / "runs")) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["train/grad_norm"] > 0 for r in rows)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    cmd = [sys.executable, str(ROOT / "algos" / "score.py")] + TINY + [
        "--total-steps", "500", "--eval-every", "1000", "--save-every", "1000", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    assert step >= 1 and [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step
    _run(["--resume", str(run), "--total-steps", str(step + 1)], tmp_path)
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step + 1


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, flag", [
    (["--batch-size", "0"], "--batch-size"), (["--alpha", "-1"], "--alpha"), (["--beta2", "-0.1"], "--beta2"),
    (["--offline-frac", "1.5"], "--offline-frac"), (["--stage1-steps", "0", "--stage2-steps", "0"], "--stage2-steps"),
    (["--eval-temperature", "0"], "--eval-temperature"), (["--task", "nosuch"], "--task"),
    (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_flag_exits_2_with_one_line_before_any_model(flags, flag, tmp_path, monkeypatch, capsys):
    import shared.run
    from shared.args import cli

    module = importlib.import_module("algos.score")
    monkeypatch.setattr(shared.run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(sys, "argv", ["score.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        module.main(cli(module.Args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


def test_batch_size_must_split_across_processes(capsys):
    from shared.args import check_args

    with pytest.raises(SystemExit):
        check_args(Args(batch_size=3), world=2)
    assert capsys.readouterr().err.strip() == "error: --batch-size 3: must be divisible by the 2 processes"


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "score.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 0
    lines = [line.strip("│╭╮╰╯─ ") for line in out.stdout.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("-")] + [len(lines)]
    entries = {lines[i].split()[0].rstrip(","): " ".join(lines[i:j]) for i, j in zip(starts, starts[1:])}
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} missing from --help"
        assert len(entries[flag].split("(default:")[0]) > len(flag) + 10, f"{flag} has no description"


# ---------------------------------------------------------------- --token-budget (subprocess)
@pytest.mark.slow
def test_token_budget_ends_the_run_and_counts_both_turns_but_no_evaluation(tmp_path):
    """Both turns count, offline first answers (the base model's) too; the two-turn evaluation (with its --eval-k
    samples) does not. 4 problems × 2 turns × ≤ 8 tokens = ≤ 64 tokens a step: 150 ends it after step 3."""
    from tests.test_grpo import check_budget_stop

    _run(TINY + ["--total-steps", "50", "--eval-every", "2", "--save-every", "1000", "--eval-k", "2",
                 "--offline-frac", "0.5", "--token-budget", "150"], tmp_path)
    run = only_run(tmp_path)
    train = [r for r in read_metrics(run) if "train/loss" in r]
    check_budget_stop(run, 150, [round((r["score/len_t1"] + r["train/completion_len"]) * 4) for r in train], 50,
                      eval_key="eval/acc_t2")
    assert len(train) == 3 and "eval/acc_t1" in read_metrics(run)[-2]  # the final two-turn evaluation at step 3


@pytest.mark.slow
def test_token_budget_never_reached_changes_nothing(tmp_path):
    from tests.test_grpo import strip_perf

    flags = TINY + ["--total-steps", "4", "--eval-every", "2", "--baseline", "--offline-frac", "0.5"]
    _run(flags, tmp_path / "plain")
    _run(flags + ["--token-budget", "1000000"], tmp_path / "budget")
    plain, budget = (strip_perf(read_metrics(only_run(tmp_path / p))) for p in ("plain", "budget"))
    assert [r["score/stage"] for r in plain if "train/loss" in r] == [1, 1, 2, 2] and plain == budget

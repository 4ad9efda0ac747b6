"""SPC: the spec's hand-computed numbers (papers/spc.md §8, tests 1–10), the identity with GRPO on
one-token responses, validation on hand-made rollouts, the teacher and the step-error benchmark, and
subprocess runs on the tiny model (one self-play round, resume, SIGTERM, bad flags)."""

import copy
import dataclasses
import importlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from algos import spc
from algos.spc import (Row, accept_sneaky, balance, mean_logprob, paired_reward, parse_sneaky_step, parse_verdict,
                       reduce_rows, rl_row_loss, sneaky_rewards, spc_loss)
from shared import step_errors as se
from shared.steps import check_steps
from shared.tasks import load_task
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- §8 tests 1–4: the sequence-level clip
@pytest.mark.parametrize("adv, diff, loss, grad", [
    (1.0, 0.1, -1.105171, -1.105171),   # 1: inside the clip range
    (1.0, 0.3, -1.2, 0.0),              # 2: ρ = 1.349859 clipped at 1 + ε, no gradient
    (-1.0, 0.3, 1.349859, 1.349859),    # 3: A < 0 is not clipped above
    (-1.0, -0.3, 0.8, 0.0),             # 4: ρ = 0.740818 clipped at 1 − ε
    (1.0, -0.3, -0.740818, -0.740818)])  # 4: A > 0 is not clipped below
def test_clipped_row_loss_value_and_gradient(adv, diff, loss, grad):
    lbar = torch.tensor([-1.0 + diff], dtype=torch.float64, requires_grad=True)
    out = rl_row_loss(lbar, torch.tensor([-1.0], dtype=torch.float64), torch.tensor([adv]), epsilon=0.2)
    out.sum().backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert lbar.grad.item() == pytest.approx(grad, abs=1e-6)


def test_ratio_values():
    assert math.exp(0.1) == pytest.approx(1.105171, abs=1e-6) and math.exp(-0.3) == pytest.approx(0.740818, abs=1e-6)


def test_kl_coeff_is_spag_advantage_and_zero_by_default():
    lbar = torch.tensor([-0.9], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0], dtype=torch.float64)
    a = torch.tensor([1.0])
    assert torch.equal(rl_row_loss(lbar, ref, a), rl_row_loss(lbar, ref, a, kl_coeff=0.0))
    out = rl_row_loss(lbar, ref, a, kl_coeff=0.5)  # A' = 1 − 0.5·0.1 = 0.95, ρ = e^0.1 unclipped
    assert out.item() == pytest.approx(-0.95 * math.exp(0.1), abs=1e-9)
    out.backward()  # d/dℓ̄ of −(A − β d)e^d = −(A − β d − β) e^d: the β term is not detached
    assert lbar.grad.item() == pytest.approx(-(1 - 0.05 - 0.5) * math.exp(0.1), abs=1e-9)


# ---------------------------------------------------------------- §8 test 5: the reduction
@pytest.mark.parametrize("rl, per_row, group_mean", [
    ([-1.1, 0.8], -0.075, -0.075), ([-1.1, 0.8, -1.0], -0.30625, -0.358333)])
def test_reduction(rl, per_row, group_mean):
    rl, sft = torch.tensor(rl), torch.tensor([-0.5])
    assert reduce_rows(rl, sft, alpha=0.15, reduction="per_row").item() == pytest.approx(per_row, abs=1e-6)
    assert reduce_rows(rl, sft, alpha=0.15, reduction="group_mean").item() == pytest.approx(group_mean, abs=1e-6)


@pytest.mark.parametrize("reduction", ["per_row", "group_mean"])
def test_micro_batches_with_global_counts_sum_to_the_batch_loss(reduction):
    gen = torch.Generator().manual_seed(0)
    lbar, ref = -torch.rand(7, generator=gen), -torch.rand(7, generator=gen)
    adv = torch.tensor([1.0, -1, 1, 0, 0, -1, 0])
    sft = torch.tensor([False, False, False, True, True, False, True])
    kw = dict(alpha=0.15, reduction=reduction)
    full, _ = spc_loss(lbar, ref, adv, sft, **kw)
    parts = sum(spc_loss(lbar[s], ref[s], adv[s], sft[s], n_rl=4, n_sft=3, **kw)[0] for s in (slice(0, 2), slice(2, 5), slice(5, 7)))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


# ---------------------------------------------------------------- §8 test 6: length normalisation and padding
def test_duplicated_response_leaves_lbar_and_ratio_unchanged():
    logp = torch.tensor([[-0.5, -1.5, -1.0]])
    twice = torch.cat([logp, logp], dim=1)
    assert mean_logprob(twice, torch.ones(1, 6)).item() == pytest.approx(mean_logprob(logp, torch.ones(1, 3)).item())
    ref = torch.tensor([-0.9])
    assert torch.allclose(rl_row_loss(mean_logprob(twice, torch.ones(1, 6)), ref, torch.tensor([1.0])),
                          rl_row_loss(mean_logprob(logp, torch.ones(1, 3)), ref, torch.tensor([1.0])))


def test_padding_never_enters_lbar():
    logp = torch.tensor([[-0.5, -1.5, -7.0, -9.0]])  # the last two positions are padding (the official bug: they count)
    mask = torch.tensor([[1.0, 1, 0, 0]])
    assert mean_logprob(logp, mask).item() == pytest.approx(-1.0)


def _tiny():
    from shared.models import load_model

    return load_model("tiny", device="cpu", seed=0)


def test_right_padded_row_in_a_batch_has_the_same_lbar_as_alone():
    model, tok = _tiny()
    short, long_ = Row([5, 6, 7], [8, 9]), Row([5, 6, 7, 10, 11], [12, 13, 14, 15, 16, 2])
    with torch.no_grad():
        alone = spc.row_lbar(model, [short], tok.pad_token_id, "cpu")
        both = spc.row_lbar(model, [short, long_], tok.pad_token_id, "cpu")
        other = spc.row_lbar(model, [long_], tok.pad_token_id, "cpu")
    assert both[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert both[1].item() == pytest.approx(other.item(), abs=1e-5)


# ---------------------------------------------------------------- §8 test 7: verdict parsing
@pytest.mark.parametrize("text, strict, stripped", [
    ("The step is fine.\n<Answer>Correct</Answer>", 1, 1), ("<Answer>incorrect</Answer>", -1, -1),
    ("<Answer>CORRECT</Answer>", 1, 1), ("<Answer> Correct </Answer>", 0, 1), ("no tag at all", 0, 0),
    ("<Answer>Correct.", 0, 0), ("<Answer>Correct", 0, 0), ("<Answer>Incorrect\n", 0, 0), ("<Answer>Incorrect</Answer> then <Answer>Correct</Answer>", -1, -1),
    ("x</Answer> <Answer>Correct</Answer>", 1, 1), ("<Answer>Correct.</Answer>", 0, 0), ("", 0, 0),
    ("<answer>Correct</answer>", 0, 0)])
def test_parse_verdict(text, strict, stripped):
    assert parse_verdict(text) == strict and parse_verdict(text, strip=True) == stripped


def test_parse_verdict_reads_a_bounded_prefix():
    assert parse_verdict("x" * 10**6 + "<Answer>Correct</Answer>") == 0


@pytest.mark.parametrize("text, expected", [
    ("Error Type 1: calculation error.\n<Step>11 + 5 = 17</Step>", "11 + 5 = 17"),
    ("<Step>a</Step> then <Step> 11 + 5 = 15 </Step>", "11 + 5 = 15"),  # the last block
    ("<Step>11 + 5 = 16</Step>", None), ("<Step>11  +  5 = 16</Step>", None),  # the original up to whitespace
    ("<Step></Step>", None), ("<Step>11 + 5 = 17", None), ("no block", None),
    ("<Step>11 + 5 = 17 (an error)</Step>", None), ("<Step>Incorrect: 11 + 5 = 17</Step>", None),
    ("<Step>11 + 5\n= 17</Step>", None)])
def test_parse_sneaky_step(text, expected):
    assert parse_sneaky_step(text, "11 + 5 = 16") == expected


# ---------------------------------------------------------------- §8 test 8: the reward table
def test_game_rewards():
    assert sneaky_rewards(True, -1) == (1, -1)  # validated, critic says Incorrect: the critic wins
    assert sneaky_rewards(True, 1) == (-1, 1)  # validated, critic fooled: the generator wins
    assert sneaky_rewards(True, 0) == (None, None)  # unparseable verdict: no rows
    assert sneaky_rewards(False, -1) == (None, -1) and sneaky_rewards(False, 0) == (None, -1)  # failed validation
    assert sneaky_rewards(False, 1, failed="drop") == (None, None)
    assert paired_reward(1) == 1 and paired_reward(-1) == -1 and paired_reward(0) is None


def test_balance_keeps_every_minority_row_and_as_many_majority_rows():
    rewards = [1, 1, -1, 1, 1, -1, 1]
    kept = balance(rewards, random.Random(0))
    assert sorted(rewards[i] for i in kept) == [-1, -1, 1, 1] and kept == sorted(kept)
    assert balance([1, 1, 1], random.Random(0)) == []


# ---------------------------------------------------------------- §8 test 9: validation thresholds
@pytest.mark.parametrize("orig, sneaky, ok", [(7, 1, True), (3, 0, False), (7, 6, False), (6, 2, True), (6, 3, False)])
def test_validation_thresholds(orig, sneaky, ok):
    assert accept_sneaky(orig / 8, sneaky / 8) is ok


def test_validation_on_hand_made_rollouts(monkeypatch):
    """A solver that copies the last result of the solution into its answer (7 times in 8) and slips
    once: the truly wrong step drops its success from 7/8 to 0/8 (accepted); a rewording of the right
    step does not (rejected)."""
    from shared.sampling import Rollout

    task = load_task("multistep", n_train=4, n_test=1)
    p = task.train[0]
    prefix, step = p.meta["steps"][:1], p.meta["steps"][1]
    wrong = se.plant_error(step, se.known_numbers(p, prefix), "calculation error", random.Random(0))[0]
    rewording = f"Adding gives {step}"

    def fake_sample(model, tok, prompts, args, *, n=1, temperature=1.0, max_new_tokens=None):
        texts = []
        for prompt in prompts:
            last = prompt.rstrip("\n").rsplit("= ", 1)[-1]
            texts += [f"Answer: {last}"] * (n - 1) + [f"Answer: {int(last) + 100}"]
        return Rollout(*(torch.zeros(len(texts), 1) for _ in range(4)), texts, torch.zeros(len(texts), dtype=torch.bool))

    monkeypatch.setattr(spc, "sample", fake_sample)
    args = spc.Args(validation_rollouts=8)
    p_orig, p_wrong, p_reword = spc.solver_success(None, _tiny()[1], task, [(p, prefix, s) for s in (step, wrong, rewording)], args)
    assert (p_orig, p_wrong, p_reword) == (7 / 8, 0.0, 7 / 8)
    assert accept_sneaky(p_orig, p_wrong) and not accept_sneaky(p_orig, p_reword)


@pytest.mark.parametrize("text, cut", [("3 + 8 = 11\nAnswer: 11\nNow 11 + 5 = 16", "3 + 8 = 11\nAnswer: 11"),
                                       ("no answer line 12", "no answer line 12"), ("The answer is 9.\n10", "The answer is 9.")])
def test_a_solution_ends_at_its_first_answer_line(text, cut):
    assert spc.up_to_answer(text) == cut


def test_solver_prompt_holds_the_worked_examples():
    task, tok = load_task("multistep", n_train=3, n_test=1), _tiny()[1]
    one = spc.solver_prompt(tok, task, task.test[0], spc.Args(solver_shots=1))
    assert task.train[0].meta["solution"] in one and task.train[1].meta["solution"] not in one
    assert one.endswith(spc.encode_chat(tok, [{"role": "user", "content": task.test[0].prompt}]).split("<|im_end|>")[-1])
    assert task.train[0].prompt not in spc.solver_prompt(tok, task, task.test[0], spc.Args(solver_shots=0))


# ---------------------------------------------------------------- §8 test 10: the reference stays frozen
def test_reference_is_frozen_and_the_policy_moves():
    from types import SimpleNamespace

    from accelerate import Accelerator

    model, tok = _tiny()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    lm = SimpleNamespace(model=model, tokenizer=tok, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         params=params, accelerator=Accelerator(cpu=True))
    role = spc.Role("critic", lm, ref)
    rows = [Row([5, 6, 7], [8, 9, 2], 1.0), Row([5, 6], [10, 2], -1.0), Row([7, 7], [11, 12, 2])]
    with torch.no_grad():
        for q in ref.parameters():  # a reference that differs from the policy, as after round 0
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))
        before_ref, before = spc.row_lbar(ref, rows, tok.pad_token_id, "cpu"), spc.row_lbar(model, rows, tok.pad_token_id, "cpu")
        expected, _ = spc_loss(before, before_ref, torch.tensor([1.0, -1, 0]), torch.tensor([False, False, True]))
    stats = spc.train_rows(role, rows, spc.Args(micro_batch_size=2), torch.Generator().manual_seed(0), epochs=1, batch_size=3, alpha=0.15)
    with torch.no_grad():
        after_ref, after = spc.row_lbar(ref, rows, tok.pad_token_id, "cpu"), spc.row_lbar(model, rows, tok.pad_token_id, "cpu")
    assert torch.equal(before_ref, after_ref) and not torch.equal(before, after) and stats["opt_steps"] == 1
    assert stats["loss"] == pytest.approx(expected.item(), abs=1e-5)  # ℓ̄_ref from π_ref, not from the policy
    assert all(not q.requires_grad for q in ref.parameters())


# ---------------------------------------------------------------- identities with simpler methods
def test_one_token_responses_equal_grpo_token_level_clip():
    """With |y| = 1 the sequence ratio is the token ratio: SPC's RL rows are GRPO's surrogate (β = 0,
    ε_low = ε_high = ε, seq_mean_token_mean) with π_old = π_ref and Â = A."""
    from algos.grpo import grpo_loss

    gen = torch.Generator().manual_seed(3)
    lbar = (-torch.rand(8, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    ref = lbar.detach() + (torch.rand(8, generator=gen, dtype=torch.float64) - 0.5)  # some rows clipped
    adv = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1], dtype=torch.float64)
    ours, _ = spc_loss(lbar, ref, adv, torch.zeros(8, dtype=torch.bool), epsilon=0.2)
    (g_ours,) = torch.autograd.grad(ours, lbar)
    theirs, _ = grpo_loss(lbar[:, None], ref[:, None], None, adv, torch.ones(8, 1), eps_low=0.2, eps_high=0.2)
    (g_theirs,) = torch.autograd.grad(theirs, lbar)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-12) and torch.allclose(g_ours, g_theirs, atol=1e-12)
    assert (g_ours == 0).any() and (g_ours != 0).any()


def test_positive_rows_at_the_reference_have_the_sft_gradient():
    """A = +1 and π_θ = π_ref: the RL row gradient is the gradient of −ℓ̄ (SFT on the mean log-likelihood)."""
    lbar = torch.tensor([-0.7, -1.3], requires_grad=True)
    (g_rl,) = torch.autograd.grad(spc_loss(lbar, lbar.detach(), torch.ones(2), torch.zeros(2, dtype=torch.bool))[0], lbar)
    (g_sft,) = torch.autograd.grad(spc_loss(lbar, lbar.detach(), torch.ones(2), torch.ones(2, dtype=torch.bool), alpha=1.0)[0], lbar)
    assert torch.allclose(g_rl, g_sft) and torch.allclose(g_rl, torch.full((2,), -0.5))


# ---------------------------------------------------------------- the teacher and the benchmark
def test_teacher_targets_parse_to_their_labels():
    task = load_task("multistep", n_train=30, n_test=1, level=3)
    critic, generator = spc.teacher_examples(task.train, 40, seed=0)
    assert len(critic) == len(generator) == 40
    verdicts = [parse_verdict(t) for _, t in critic]
    assert set(verdicts) == {1, -1} and 0 not in verdicts
    for messages, target in critic:
        step = messages[1]["content"].split("## Last Step\n")[1]
        assert (parse_verdict(target) == 1) == (f"The last step {step} is right" in target)
    for messages, target in generator:
        original = messages[1]["content"].split("## Correct Next Step\n")[1].split("\n")[0]
        assert parse_sneaky_step(target, original) is not None
    assert spc.teacher_examples(task.train, 40, seed=0) == (critic, generator)


@pytest.mark.parametrize("level", [1, 3, 4])
def test_planted_errors_are_wrong_where_they_are_planted(level):
    task = load_task("multistep", n_train=1, n_test=60, level=level)
    sols = se.planted_solutions(task.test, seed=0)
    assert sols == se.planted_solutions(task.test, seed=0) and sols != se.planted_solutions(task.test, seed=1)
    planted = [s for s in sols if s.first_error >= 0]
    assert 10 < len(planted) < 50
    for p, s in zip(task.test, sols):
        k = s.first_error
        if k < 0:
            assert s.steps == p.meta["steps"] and check_steps("\n".join(s.steps), p.meta["numbers"]).all_ok
            continue
        assert s.steps[:k] == p.meta["steps"][:k] and len(s.steps) == k + 1
        assert s.steps[k].split(" = ")[1] != p.meta["steps"][k].split(" = ")[1]  # every type changes the result


@pytest.mark.parametrize("seed", range(20))
def test_each_error_type_and_what_check_steps_sees(seed):
    rng, known = random.Random(seed), {3, 8, 5, 11}
    calc, _ = se.plant_error("11 + 5 = 16", known, "calculation error", rng)
    misread, _ = se.plant_error("11 + 5 = 16", known, "misread number", rng)
    op, _ = se.plant_error("11 + 5 = 16", known, "wrong operation", rng)
    first = lambda step: check_steps(f"3 + 8 = 11\n{step}", [3, 8, 5]).first_error  # noqa: E731
    assert first(calc) == 1 and first(misread) == 1 and first(op) is None  # a wrong operation is grounded arithmetic
    assert op in ("11 - 5 = 6", "11 * 5 = 55")
    # never the same result, never below zero
    assert se.plant_error("2 + 2 = 4", {2}, "wrong operation", rng)[0] == "2 - 2 = 0"
    assert se.plant_error("3 + 5 = 8", {3, 5}, "wrong operation", rng)[0] == "3 * 5 = 15"


def test_own_solutions_locate_the_first_wrong_step():
    task = load_task("multistep", n_train=1, n_test=3)
    p = task.test[0]
    (a, op1, b, _, c1), (_, op2, c, _, ans) = (s.split() for s in p.meta["steps"])
    verify = lambda t, q: task.verify(t, q).correct  # noqa: E731
    texts = [p.meta["solution"],  # right: skipped
             f"{a} {op1} {b} = {c1}\n{c1} {op2} {c} = {int(ans) + 1}\nAnswer: {int(ans) + 1}",  # arithmetic slip at step 2
             f"{a} {op1} {b} = {int(c1) + 1}\nAnswer: 999",  # slip at step 1
             "I do not know. Answer: 12345"]  # wrong, nothing to locate
    sols, unlocated = se.own_solutions([p] * 4, texts, verify)
    assert [s.first_error for s in sols] == [1, 0] and unlocated == 1
    assert sols[0].steps == [p.meta["steps"][0], f"{c1} {op2} {c} = {int(ans) + 1}"] and sols[0].source == "own"


def test_benchmark_metrics_by_hand():
    S = se.Solution
    sols = [S("p", ["a", "b"], -1, "reference"), S("p", ["a", "x"], 1, "planted"), S("p", ["y"], 0, "own"),
            S("p", ["a", "b"], -1, "reference")]
    verdicts = [[1, 1], [1, -1], [1], [-1, 0]]
    m = se.benchmark_metrics(sols, verdicts)
    # correct steps: 1, 1, 1, −1, (invalid excluded) → 3/4; error steps: −1, 1 → 1/2
    assert m["acc_correct_step"] == 0.75 and m["acc_error_step"] == 0.5 and m["accuracy"] == 0.625
    assert m["harmonic"] == pytest.approx(0.6) and m["valid_rate"] == pytest.approx(6 / 7)
    # solutions: erroneous 2 (one found at index 1, one missed) → 1/2; correct 2 (one clean, one flagged) → 1/2
    assert m["first_error_acc"] == 0.5 and m["no_error_acc"] == 0.5 and m["f1"] == 0.5
    assert m["acc_error_planted"] == 1.0 and m["acc_error_own"] == 0.0


# ---------------------------------------------------------------- flags
BAD = [(["--games", "0"], "--games"), (["--p-orig-min", "1.5"], "--p-orig-min"), (["--epsilon", "2"], "--epsilon"),
       (["--task", "arith"], "--task"), (["--reduction", "nosuch"], "--reduction"), (["--opponent", "x"], "--opponent"),
       (["--validation-rollouts", "0"], "--validation-rollouts"), (["--processbench", "nosuch"], "--processbench")]


@pytest.fixture
def no_model(monkeypatch):
    import shared.run

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(shared.run, "load_model", refuse)


def _error(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    return e.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("flags, flag", BAD)
def test_bad_flag_exits_2_with_one_line_before_any_work(flags, flag, tmp_path, monkeypatch, capsys, no_model):
    from shared.args import cli

    monkeypatch.setattr(sys, "argv", ["spc.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    code, err = _error(capsys, lambda: spc.main(cli(spc.Args)))
    assert code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


def test_several_processes_are_refused_with_one_line(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _error(capsys, lambda: spc.main(spc.Args(model="tiny", output_dir=str(tmp_path / "runs"))))
    assert code == 2 and "one process" in err and "\n" not in err and not (tmp_path / "runs").exists()


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "spc.py"), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 0 and "one process" in out.stdout
    lines = [line.strip("│╭╮╰╯─ ") for line in out.stdout.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("-")] + [len(lines)]
    entries = {lines[i].split()[0].rstrip(","): " ".join(lines[i:j]) for i, j in zip(starts, starts[1:])}
    for f in dataclasses.fields(spc.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries or f"--no-{f.name.replace('_', '-')}" in " ".join(entries), f"{flag} missing from --help"


# ---------------------------------------------------------------- runs on the tiny model (subprocess)
TINY = ["--model", "tiny", "--n-train", "16", "--n-test", "4", "--sft-steps", "2", "--sft-batch-size", "4",
        "--sft-examples", "16", "--games", "3", "--validation-rollouts", "2", "--max-new-tokens", "8",
        "--solver-max-new-tokens", "6", "--batch-size", "4", "--micro-batch-size", "4", "--no-balance"]


def _run(args, out_dir, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "spc.py"), *args, "--output-dir", str(out_dir)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_one_self_play_round(tmp_path):
    _run(TINY + ["--iterations", "1", "--search-problems", "2"], tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    game = [r for r in rows if "spc/games" in r]
    assert len(game) == 1 and game[0]["step"] == 3 and game[0]["spc/games"] == 3
    for key in ("spc/parsed", "spc/validated_yield", "spc/generator_rows", "spc/generator/loss", "perf/step_s"):
        assert key in game[0] and math.isfinite(game[0][key])
    assert sum("eval/f1" in r for r in rows) == 3  # base, after round 0, after round 1
    assert [r["step"] for r in rows if "sft/critic_loss" in r] == [1, 2]
    assert any("search/accuracy_critic" in r for r in rows)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["round"] == 1 and state["sft_step"] == 2 and state["generator"]["optimizer"]["state"]
    assert (run / "round0.pt").exists() and json.loads((run / "benchmark.json").read_text())["solutions"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(TINY + ["--iterations", "2"], straight)
    _run(TINY + ["--iterations", "1"], split)
    run = only_run(split)
    _run(["--resume", str(run), "--iterations", "2"], split)
    a, b = only_run(straight) / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert (sa["round"], sa["cursor"], sa["sft_cursor"]) == (sb["round"], sb["cursor"], sb["sft_cursor"]) == (2, 6, 8)
    ga, gb = sa["generator"], sb["generator"]
    assert all(torch.equal(ga["params"][k], gb["params"][k]) for k in ga["params"])
    for opt_a, opt_b in ((sa["optimizer"], sb["optimizer"]), (ga["optimizer"], gb["optimizer"])):
        for k in opt_a["state"]:
            assert torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"])
            assert torch.equal(opt_a["state"][k]["exp_avg_sq"], opt_b["state"][k]["exp_avg_sq"])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"]) and sa["rng"][0]["python"] == sb["rng"][0]["python"]
    assert [r["step"] for r in read_metrics(run) if "spc/games" in r] == [3, 4]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    flags = [f for f in TINY] + ["--sft-steps", "400", "--iterations", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "algos" / "spc.py"), *flags, "--output-dir", str(tmp_path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until an SFT step is logged
        runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
        if runs and any("sft/critic_loss" in r for r in read_metrics(runs[0])):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after" in out, out[-2000:]
    run = only_run(tmp_path)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    logged = [r["step"] for r in read_metrics(run) if "sft/critic_loss" in r]
    assert 1 <= state["sft_step"] < 400 and logged[-1] == state["sft_step"] and "generator" in state
    _run(["--resume", str(run), "--sft-steps", str(state["sft_step"] + 1), "--iterations", "0"], tmp_path)
    assert [r["step"] for r in read_metrics(run) if "sft/critic_loss" in r][-1] == state["sft_step"] + 1


def test_module_imports_without_side_effects():
    importlib.reload(spc)


def test_processbench_rows_become_solutions_cut_after_the_first_error(monkeypatch):
    import shared.tasks

    rows = [{"id": "gsm8k-0", "generator": "x", "problem": "P", "steps": ["s1", "s2", "s3"], "final_answer_correct": False,
             "label": 1}, {"id": "gsm8k-1", "generator": "x", "problem": "Q", "steps": ["t1", "t2"], "final_answer_correct": True,
                           "label": -1}]
    monkeypatch.setattr(shared.tasks, "_load_hub_dataset", lambda task, path, config=None: {"gsm8k": rows})
    sols = se.processbench_solutions("gsm8k")
    assert sols == [se.Solution("P", ["s1", "s2"], 1, "processbench"), se.Solution("Q", ["t1", "t2"], -1, "processbench")]


# ---------------------------------------------------------------- the token budget (--token-budget)
SMALL = dict(model="tiny", n_train=16, n_test=2, sft_steps=1, epochs=1, sft_batch_size=4, sft_examples=16, games=3, validation_rollouts=2,
             max_new_tokens=8, solver_max_new_tokens=6, batch_size=4, micro_batch_size=4, balance=False, iterations=2)

REAL_PLAY_ROUND = spc.play_round  # the unwrapped original (each run wraps it afresh)


def _budget_run(tmp_path, monkeypatch, name, **kw):
    """An in-process run of 1 SFT step and 2 rounds: (metrics, the count after each round's game)."""
    from shared.sampling import generated_tokens
    after, real = [], REAL_PLAY_ROUND

    def counted(*a, **k):
        out = real(*a, **k)
        after.append(generated_tokens())
        return out
    monkeypatch.setattr(spc, "play_round", counted)
    out = spc.main(spc.Args(**SMALL, output_dir=str(tmp_path / name), **kw))
    return read_metrics(only_run(tmp_path / name)), after


def _train(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows if "spc/games" in r]


def test_token_budget_ends_the_game_after_the_round_that_spends_it_and_evaluation_is_not_counted(tmp_path, monkeypatch):
    rows, after = _budget_run(tmp_path, monkeypatch, "free", search_problems=2)
    assert len(after) == 2 and 0 < after[0] < after[1]
    evals = [r for r in rows if "eval/accuracy" in r]  # base, after SFT (no generation), after rounds 1 and 2
    assert [(r["step"], r["perf/gen_tokens"]) for r in evals] == [(0, 0), (1, 0), (2, after[0]), (3, after[1])]
    assert [r["perf/gen_tokens"] for r in rows if "search/accuracy_critic" in r] == [after[1]]  # the search is not counted
    b_rows, b_after = _budget_run(tmp_path, monkeypatch, "budget", token_budget=after[0] - 1)  # spent in round 1
    assert b_after == after[:1] and [r["step"] for r in b_rows if "spc/games" in r] == [2]
    last = [r for r in b_rows if "eval/accuracy" in r][-1]
    assert last["step"] == 2 and last["perf/gen_tokens"] == after[0]  # ≥ the budget, overshoot within one round
    assert torch.load(only_run(tmp_path / "budget") / "checkpoint" / "trainer_state.pt", weights_only=False)["round"] == 1
    big_rows, _ = _budget_run(tmp_path, monkeypatch, "big", token_budget=10**9)  # never reached: the same game
    assert _train(big_rows) == _train(rows) and len(_train(rows)) == 2

"""STaR / B-STaR: the spec's §8 numbers (balance score, thresholds, dedup, monitors, step schedule, the
48 × 4 configuration search), the step-checker process reward, hint stripping, the loss mask,
restart-from-base vs continue, in-process runs that train, and subprocess smoke runs with resume.
Each test names the bug it catches; docs/star/broken_copies.md lists the broken copies they were run against."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import algos.star as star
from algos.star import (Example, Sample, balance_score, balance_scores, balance_terms, begin_iteration, build_batch,
                        bstar_reward, equations, finetune, initial_state, monitor_metrics, n_star,
                        prm_min_score, search_config, select, sft_loss, star_collect, star_steps, step_reward,
                        step_rewards)
from shared.logprobs import token_logprobs
from shared.models import build_tiny_model, build_tiny_tokenizer, chat_prompt
from shared.run import LM
from shared.tasks import Problem, load_task
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def S(text, correct, reward=None):
    return Sample(text, [], correct, float(correct) if reward is None else reward)


# ---------------------------------------------------------------- §8.1–8.3 balance score
def test_balance_score_worked_example():
    assert n_star(67500, 11500) == 6
    bs = balance_scores([10, 3, 4], [8, 3, 0], 6)
    assert bs == pytest.approx([0.8, 0.5, 0.0])
    assert sum(bs) / 3 == pytest.approx(0.4333, abs=1e-4)
    assert sum(balance_scores([10, 3, 4], [8, 3, 0], 8)) / 3 == pytest.approx(0.3917, abs=1e-4)  # the code's n* = 8


def test_balance_score_paper_examples_and_empty_query():
    all64 = [S(f"c{i}", True) for i in range(16)] + [S(f"w{i}", False, 0.5) for i in range(48)]
    assert balance_score([all64], 0.0, 6) == pytest.approx(0.25)  # 64 selected, 16 correct
    assert balance_score([[S("a", True), S("b", True)]], 0.0, 6) == pytest.approx(1 / 3)  # 2 correct selected
    assert balance_score([[S("w", False)]], 0.0, 6) == 0.0  # n_i = 0 → bs_i = 0, no division by zero
    assert balance_scores([0], [0], 6) == [0.0]


def test_duplicates_count_once_in_n_and_n_prime():
    group = [S("same", True), S("same", True), S("wrong", False, 0.2)]
    kept = select(group, 0.0)
    assert [s.text for s in kept] == ["same", "wrong"]  # n = 2, n' = 1
    assert balance_score([group], 0.0, 1) == pytest.approx(0.5)  # without dedup: min(2,1)·2/3 = 0.667


# ---------------------------------------------------------------- §8.4 reward and threshold
def test_reward_and_strict_threshold():
    right = S("r", True, bstar_reward(True, -0.5))
    wrong = S("w", False, bstar_reward(False, 0.3))
    assert right.reward == pytest.approx(0.5) and wrong.reward == pytest.approx(0.3)
    assert [s.text for s in select([right, wrong], 0.0)] == ["r", "w"]  # a wrong answer passes τ = 0 (§7.10)
    assert [s.text for s in select([right, wrong], 0.3)] == ["r"]  # strict r > τ
    assert bstar_reward(True) == 1.0 and bstar_reward(False) == 0.0


def test_prm_is_the_minimum_step_score_in_minus_one_one():
    logits = torch.tensor([0.0, 2.0, -1.0])
    assert prm_min_score(logits) == pytest.approx(2 * torch.sigmoid(torch.tensor(-1.0)).item() - 1)
    assert -1 < prm_min_score(torch.tensor([-3.0, 3.0])) < 0 and prm_min_score(torch.tensor([-80.0, 1e4])) >= -1


# ---------------------------------------------------------------- the step checker as r_prm (issue 11 item 5)
def test_step_reward_ranks_a_right_answer_through_a_wrong_step_below_a_clean_one():
    nums = [7, 5, 8]  # "7 - 5 + 8" = 10
    clean = "7 - 5 = 2\n2 + 8 = 10\nAnswer: 10"
    lucky = "7 - 5 = 3\n3 + 7 = 10\nAnswer: 10"  # right answer, first step wrong
    late = "7 - 5 = 2\n2 + 8 = 11\nAnswer: 10"  # right answer, second step wrong
    invented = "7 - 5 = 2\n2 + 9 - 1 = 10\nAnswer: 10"  # right arithmetic, but 9 and 1 come from nowhere
    assert step_reward(clean, nums) == 1.0
    assert step_reward(lucky, nums) == -1.0 and step_reward(late, nums) == 0.0 and step_reward(invented, nums) == 0.0
    assert step_reward("Answer: 10", nums) == -1.0  # no reasoning at all
    r = {k: bstar_reward(True, step_reward(t, nums)) for k, t in [("clean", clean), ("lucky", lucky), ("late", late)]}
    assert r["clean"] == 2.0 > r["late"] > r["lucky"]  # the earlier the first wrong step, the lower
    wrong_clean = bstar_reward(False, step_reward("7 - 5 = 2\nAnswer: 2", nums))  # right steps, wrong (early) answer
    assert wrong_clean == 1.0 and select([S("w", False, wrong_clean)], 0.5)  # passes a low τ: exploitation < 1
    problem = Problem("Solve 7 - 5 + 8 ...", "10", {"numbers": nums})
    assert step_rewards(problem, [clean, lucky]) == [1.0, -1.0]


def test_threshold_search_trades_exploitation_against_exploration():
    """With the step reward the argmax τ moves with the exploitation term: where wrong answers with clean
    steps (r = 1) are common, τ ≥ 1 drops them; where right answers through a wrong step (r = 0) are common,
    τ < 0 keeps them. The answer-only reward cannot tell either apart from the clean right answers."""
    nums = [7, 5, 8]
    texts = {"clean": ("7 - 5 = 2\n2 + 8 = 10\nAnswer: 10", True), "clean2": ("7 - 5 = 2\n8 + 2 = 10\nAnswer: 10", True),
             "lucky": ("7 - 5 = 3\n3 + 7 = 10\nAnswer: 10", True), "lucky2": ("7 - 5 = 1\n1 + 9 = 10\nAnswer: 10", True),
             "short": ("7 - 5 = 2\nAnswer: 2", False), "short2": ("7 - 5 = 2\nso Answer: 2", False)}

    def group(*names):
        return [S(texts[k][0], texts[k][1], bstar_reward(texts[k][1], step_reward(texts[k][0], nums))) for k in names]
    taus = (-1.0, -0.5, 0.0, 0.5, 1.0)
    # t = 0.5: one clean right answer and two wrong ones with clean steps; t = 1.0: right answers via wrong steps
    by_t = {0.5: [group("clean", "short", "short2")] * 4, 1.0: [group("clean", "lucky", "lucky2")] * 4}
    t, tau, bs = search_config(by_t, taus, 6)
    assert (t, tau) == (1.0, -1.0) and bs == pytest.approx(3 / 6)  # τ < 0 keeps n' = 3 at n'/n = 1
    assert balance_terms(by_t[0.5], 0.5, 6)[1:] == pytest.approx((1 / 6, 1 / 3))  # τ ∈ [0, 1): two wrong kept
    assert balance_terms(by_t[0.5], 1.0, 6)[1:] == pytest.approx((1 / 6, 1.0))  # τ = 1 drops them
    by_t = {0.5: [group("clean", "clean2", "short", "short2")] * 4, 1.0: [group("clean", "lucky", "short")] * 4}
    t, tau, bs = search_config(by_t, taus, 6)
    assert (t, tau) == (0.5, 1.0) and bs == pytest.approx(2 / 6)  # here only τ = 1 makes n'/n = 1
    answer_only = {t: [[S(s.text, s.correct) for s in g] for g in gs] for t, gs in by_t.items()}
    assert search_config(answer_only, taus, 6)[:2] == (0.5, 0.0)  # r ∈ {0, 1}: every τ ∈ [0, 1) is the same


# ---------------------------------------------------------------- §8.10: the search at 48 queries × 4 samples
def _case_10():
    """t = 0.5: 30 queries give 4 identical right answers, 18 four identical wrong ones; t = 1.0: 24 give 2
    distinct right + 2 distinct wrong, 24 four distinct wrong (spec §8 case 10; no reward model)."""
    low = [[S("r", True)] * 4 if q < 30 else [S("w", False)] * 4 for q in range(48)]
    high = [[S("r1", True), S("r2", True), S("w1", False), S("w2", False)] if q < 24
            else [S(f"w{k}", False) for k in range(4)] for q in range(48)]
    return {0.5: low, 1.0: high}


def test_config_search_case_10_has_distinct_scores():
    by_t = _case_10()
    assert search_config(by_t, (0.0,), 1) == (0.5, 0.0, pytest.approx(0.625))  # n* = 1: BS = Pass@4 picks t = 0.5
    assert balance_score(by_t[1.0], 0.0, 1) == pytest.approx(0.5)
    for nstar in (4, 6, 8):
        t, tau, _ = search_config(by_t, (-0.5, 0.0, 0.5, 0.9), nstar)
        assert (t, tau) == (1.0, 0.0)  # τ ∈ [0, 1) keeps exactly the right answers; τ < 0 only lowers BS
    assert balance_score(by_t[0.5], 0.0, 6) == pytest.approx(0.1042, abs=1e-4)
    assert balance_score(by_t[1.0], 0.0, 6) == pytest.approx(0.1667, abs=1e-4)
    assert balance_score(by_t[1.0], -0.5, 6) == pytest.approx(0.0833, abs=1e-4)


def test_config_search_argmax_and_first_maximum_on_ties():
    good = [[S("a", True), S("b", True)]]  # BS = 1 with n* = 2
    half = [[S("a", True), S("x", False, 0.4)]]  # τ < 0.4: n = 2, n' = 1 → 0.25; τ ≥ 0.4: 0.5
    t, tau, bs = search_config({0.9: good, 0.5: half}, (0.0, 0.5), 2)
    assert (t, tau, bs) == (0.9, 0.0, 1.0)
    t, tau, bs = search_config({0.7: half, 0.6: half}, (0.5, 0.0, 0.4, 0.6), 2)
    assert (t, tau, bs) == (0.6, 0.4, 0.5)  # ties: lower t, then lower τ


# ---------------------------------------------------------------- §8.8–8.9 schedule, monitors
def test_star_step_schedule():
    assert [star_steps(n) for n in range(1, 6)] == [40, 48, 57, 69, 82]
    assert [star_steps(n, 500, 1.0) for n in (1, 9)] == [500, 500]  # B-STaR: constant


def test_pass_at_k_s_and_reward_at_k_s():
    g = [S("c", True, 1.0), S("c", True, 1.0), S("w", False, 0.0), S("c'", True, 1.0)]
    assert monitor_metrics([g], 2)["pass_at_k_s"] == 1.0 and monitor_metrics([g], 3)["pass_at_k_s"] == 0.0
    ranked = [S("a", True, 0.9), S("b", False, 0.8), S("c", True, 0.1), S("d", True, 0.0)]
    m = monitor_metrics([ranked], 2)
    assert m["reward_at_k_s"] == 0.0 and m["best_of_k"] == 1.0 and m["pass_at_k"] == 1.0
    ranked[1].reward = 0.05
    assert monitor_metrics([ranked], 2)["reward_at_k_s"] == 1.0
    none = monitor_metrics([[S("w", False)], [S("v", False)]], 1)
    assert none["pass_at_k"] == 0.0 and math.isnan(none["diversity"])


def test_distinct_equation_diversity():
    assert equations("First 12 + 7 = 19. Then <<19*3=57>> and $a+b=c$.") == ["12+7=19", "19*3=57", "a+b=c"]
    g = [S("12 + 7 = 19", True), S("so 12+7 = 19.", True), S("12 + 7 = 20", False), S("7 + 12 = 19", True)]
    assert monitor_metrics([g], 1)["diversity"] == pytest.approx(2 / 3)  # only correct answers count


# ---------------------------------------------------------------- §8.5 rationalization and hints
def test_rationalized_examples_are_stored_without_the_hint(monkeypatch):
    tok = build_tiny_tokenizer()
    problems = {i: Problem(f"What is {i} + 1?", str(i + 1)) for i in range(4)}
    task = SimpleNamespace(mode="last_number", system_prompt=None,
                           verify=lambda text, p: SimpleNamespace(correct=text.endswith(p.answer)))
    calls = []

    def fake_decode(lm, prompts, args, k=1, temperature=0.0, desc=""):  # q0 right at once; q1, q2 only with
        calls.append(prompts)  # the hint; q3 never; q2's hinted answer never ends
        out = []
        for p in prompts:
            q = next(i for i in problems if f"What is {i} + 1?" in p)
            hinted = "Hint" in p
            ans = str(q + 1) if (q == 0 or (hinted and q in (1, 2))) else "0"
            out.append((f"so: it is {ans}", [7, q, int(hinted)], q != 2))
        return out
    monkeypatch.setattr(star, "decode", fake_decode)
    lm = SimpleNamespace(tokenizer=tok)
    examples, counts = star_collect(lm, task, problems, star.Args())
    assert counts == {"solved": 1, "rationalized": 1}
    assert [e.query for e in examples] == [0, 1] and [e.hinted for e in examples] == [False, True]
    assert len(calls) == 2 and len(calls[1]) == 3  # rationalization only for the 3 failures
    assert all("Hint: the answer is" in p for p in calls[1]) and not any("What is 0 + 1?" in p for p in calls[1])
    for e in examples:
        assert e.prompt == chat_prompt(tok, problems[e.query].prompt) and "Hint" not in e.prompt
    assert examples[1].completion_ids == [7, 1, 1]  # the rationalized completion, under the hint-free prompt
    no_rat, c = star_collect(lm, task, problems, star.Args(rationalize=False))
    assert [e.query for e in no_rat] == [0] and c["rationalized"] == 0


def test_hint_is_the_final_answer_only():
    tok = build_tiny_tokenizer()
    ask = lambda p, mode="last_number": star.question(tok, SimpleNamespace(mode=mode, system_prompt=None), p, "{prompt} ({answer})")  # noqa: E731
    gsm = Problem("Tom has 3 apples...", "72", {"solution": "3 * 24 = <<3*24=72>>72\n#### 72"})
    assert ask(gsm) == chat_prompt(tok, "Tom has 3 apples... (72)")  # not the reference solution (pitfall 2)
    ms = load_task("multistep", n_train=1, n_test=1).train[0]
    text = star.question(tok, SimpleNamespace(mode="last_number", system_prompt=None), ms, star.Args().hint_template)
    assert f"(Hint: the answer is {ms.answer}.)" in text and ms.meta["steps"][0] not in text
    cd = Problem("Using [3, 4]...", "12", {"solution": "3 * 4", "numbers": [3, 4], "target": 12})
    assert ask(cd, "countdown") == chat_prompt(tok, "Using [3, 4]... (3 * 4)")


# ---------------------------------------------------------------- §8.7 loss mask
def _hand_nll(model, tok, e):
    """−Σ log p(completion token | prompt, earlier completion tokens), one sequence, no padding, no masks."""
    prompt = tok(e.prompt, add_special_tokens=False).input_ids
    full = torch.tensor([prompt + e.completion_ids])
    lp = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
    return -lp[torch.arange(full.shape[1] - 1), full[0, 1:]][len(prompt) - 1:].sum().item()


def test_loss_scores_exactly_the_completion_tokens_given_their_own_prompt():
    """Catches: prompt tokens in the loss, a mask off by one, prompts padded on the wrong side (pad between
    prompt and completion), and completions scored without (or with another row's) prompt: each row's loss
    must equal a hand-written cross entropy of that completion after that prompt, rows of different lengths."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(0, tok)
    rationales = ["Step 1: 12 + 30: 42. Answer: 42", "ok"]  # ':' inside a rationale shortens nothing
    prompts = [chat_prompt(tok, "Q: what is 12 + 30?\nA:"), chat_prompt(tok, "Q: 1?")]
    ex = [Example(i, p, tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id])
          for i, (p, r) in enumerate(zip(prompts, rationales))]
    batch = build_batch(tok, ex, "cpu")
    logp = token_logprobs(model, *batch)
    c_mask = batch[3]
    for row, e in enumerate(ex):
        assert int(c_mask[row].sum()) == len(e.completion_ids)
        assert -(logp[row] * c_mask[row]).sum().item() == pytest.approx(_hand_nll(model, tok, e), rel=1e-4)
    total = sum(_hand_nll(model, tok, e) for e in ex) / sum(len(e.completion_ids) for e in ex)
    assert sft_loss(logp, c_mask).item() == pytest.approx(total, rel=1e-4)
    # the completion is conditioned on its question: another question, the same completion, another loss
    other = [Example(e.query, chat_prompt(tok, "something else entirely: 99 + 1"), e.completion_ids) for e in ex]
    logp2 = token_logprobs(model, *build_batch(tok, other, "cpu"))
    assert not torch.allclose((logp * c_mask).sum(1), (logp2 * c_mask).sum(1))
    assert -(logp2[0] * c_mask[0]).sum().item() == pytest.approx(_hand_nll(model, tok, other[0]), rel=1e-4)


# ---------------------------------------------------------------- §8.6 restart from base vs continue
@pytest.mark.parametrize("restart", [True, False])
def test_star_restarts_from_base_and_bstar_continues(restart):
    from accelerate import Accelerator

    tok = build_tiny_tokenizer()
    model = build_tiny_model(0, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    args = star.resolve_mode(star.Args(mode="star" if restart else "bstar", batch_size=2, micro_batch_size=1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, star.lr_lambda(args, 10))
    base = initial_state(params, opt, sched)
    ex = [Example(i, chat_prompt(tok, f"Q{i}"), tok(f"a{i} b", add_special_tokens=False).input_ids + [2]) for i in range(3)]
    lm, gen = LM(model, tok, None, opt, sched, params, Accelerator(cpu=True)), torch.Generator().manual_seed(0)
    finetune(lm, ex, 3, args, gen)  # iteration 1
    trained = [p.detach().clone() for p in params]
    assert star.distance_from(params, base) > 0
    begin_iteration(params, opt, sched, base, args.restart_from_base)  # start of iteration 2
    steps = [int(s["step"]) for s in opt.state.values()]
    if restart:  # the base weights, a fresh Adam, the warm-up from its first step
        assert all(torch.equal(p, b) for p, b in zip(params, base["params"]))
        assert steps == [] and sched.last_epoch == 0 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 100)
    else:  # P_{i−1}, its Adam moments and its place in the schedule
        assert all(torch.equal(p, t) for p, t in zip(params, trained))
        assert set(steps) == {3} and sched.last_epoch == 3
    finetune(lm, ex, 2, args, gen)
    assert {int(s["step"]) for s in opt.state.values()} == ({2} if restart else {5})


# ---------------------------------------------------------------- in-process runs that train
SMALL = dict(model="tiny", n_train=6, n_test=4, n_dev=4, subset_size=3, group_size=2, max_new_tokens=6, steps=2,
             iterations=2, batch_size=2, temperatures=(0.7, 1.0), warmup_steps=0)


def _answers_by_query(monkeypatch, n_train, answer):
    """Replace `decode` with answer(query, temperature, k, hinted) -> [(text, ended)] for the training
    questions of multistep seed 0 (found by their prompt text); evaluation still runs the tiny model."""
    task = load_task("multistep", seed=0, n_train=n_train, n_test=1)
    tok = build_tiny_tokenizer()
    which = {p.prompt: q for q, p in enumerate(task.train)}

    def fake(lm, prompts, args, k=1, temperature=0.0, desc=""):
        out = []
        for p in prompts:
            q = next(q for text, q in which.items() if text in p)
            for text, ended in answer(q, temperature, k, "Hint" in p):
                out.append((text, tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id], ended))
        return out
    monkeypatch.setattr(star, "decode", fake)
    return task


def test_star_run_trains_on_right_and_rationalized_answers_then_restarts_from_base(tmp_path, monkeypatch):
    """Greedy answers are right for queries 0–1, the hint rescues 2–3 (through a wrong step for 3), 4–5 stay
    wrong: 4 examples, 2 of them rationalized, half of those with a wrong step; every iteration starts at θ_0."""
    def answer(q, t, k, hinted):
        p = task.train[q]
        if q < 2 or (hinted and q == 2):
            return [(p.meta["solution"], True)]
        if hinted and q == 3:
            return [(f"1 + 1 = 3\nAnswer: {p.answer}", True)]
        return [("Answer: 1000", True)]
    task = _answers_by_query(monkeypatch, 6, answer)
    out = star.main(star.Args(**SMALL, mode="star", output_dir=str(tmp_path)))
    it = [r for r in read_metrics(out["run_dir"]) if "star/selected" in r]
    assert [r["step"] for r in it] == [1, 2] and all(r["star/selected"] == 4 for r in it)
    assert it[0]["train/accuracy"] == pytest.approx(2 / 6) and it[0]["star/rationalized"] == 2
    assert it[0]["star/rationalized_wrong_step"] == 0.5 and it[0]["star/kept_wrong_step"] == 0.25
    assert [r["train/steps"] for r in it] == [2, 2]  # int(2 · 1.2) = 2
    assert it[0]["star/dist_from_base"] > 0 and it[1]["star/init_dist"] == 0.0  # iteration 2 began at θ_0
    state = torch.load(Path(out["run_dir"]) / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["iteration"] == 2 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}


def test_bstar_default_n_star_picks_the_spec_case_10_temperature(tmp_path, monkeypatch):
    """The search inside a run, on §8 case 10 (48 questions × 4 samples, distinct balance scores): the default
    n* = 6 picks t = 1.0 with BS 0.1667; n* = ⌈N/M⌉ with N scaled by K (= 1) would pick t = 0.5 (BS = Pass@4)."""
    def answer(q, t, k, hinted):
        right = task.train[q].meta["solution"]
        if t == 0.5:
            return [(right, True)] * k if q < 30 else [("Answer: 1000", True)] * k
        if q < 24:
            return [(right, True), (right + " ", True), ("Answer: 1000", True), ("Answer: 1001", True)][:k]
        return [(f"Answer: {1000 + j}", True) for j in range(k)]
    task = _answers_by_query(monkeypatch, 48, answer)
    args = dict(SMALL, n_train=48, group_size=4, subset_size=48, temperatures=(0.5, 1.0), iterations=1)
    out = star.main(star.Args(**args, mode="bstar", prm="none", monitor_temperature=1.0, output_dir=str(tmp_path)))
    (r,) = [r for r in read_metrics(out["run_dir"]) if "star/selected" in r]
    assert r["star/n_star"] == 6 and r["bstar/threshold_search"] == 0.0
    assert r["star/temperature"] == 1.0 and r["bstar/search_balance_score"] == pytest.approx(1 / 6)
    assert r["bstar/balance_score_t0.5"] == pytest.approx(0.1042, abs=1e-4)
    assert r["bstar/exploration"] == pytest.approx(1 / 6) and r["bstar/exploitation"] == 1.0
    assert r["star/selected"] == 48 and r["star/queries_covered"] == 0.5  # 2 distinct right answers × 24
    assert r["star/pass_at_k"] == 0.5 and r["star/pass_at_k_s"] == 0.5


def test_bstar_step_reward_searches_threshold_and_continues(tmp_path, monkeypatch):
    """multistep turns the step checker on by default (--prm auto): wrong answers with clean steps (r = 1) make
    τ = 1 the best threshold, and the selected set then holds no wrong answer; iteration 2 continues from P_1."""
    def answer(q, t, k, hinted):
        p = task.train[q]
        first = p.meta["steps"][0]
        return [(p.meta["solution"], True), (f"{first}\nAnswer: {first.split('= ')[1]}", True)] * (k // 2)
    task = _answers_by_query(monkeypatch, 6, answer)
    out = star.main(star.Args(**SMALL, mode="bstar", thresholds=(-1.0, 0.0, 0.5, 1.0), output_dir=str(tmp_path)))
    it = [r for r in read_metrics(out["run_dir"]) if "star/selected" in r]
    assert all(r["bstar/threshold_search"] == 1.0 and r["star/threshold"] == 1.0 for r in it)
    assert all(r["star/selected"] == 6 and r["star/kept_wrong_step"] == 0.0 for r in it)
    assert it[0]["bstar/exploitation"] == 1.0 and it[1]["star/init_dist"] > 0  # iteration 2 continued from P_1
    search = [json.loads(line) for line in (Path(out["run_dir"]) / "bstar_search.jsonl").read_text().splitlines()]
    assert search[0]["tau"] == 1.0 and search[0]["grid"]["0.7"]["0.0"][2] == pytest.approx(0.5)  # n'/n at τ = 0
    state = torch.load(Path(out["run_dir"]) / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4} and state["scheduler"]["last_epoch"] == 4


def test_bstar_with_a_prm_checkpoint(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    _answers_by_query(monkeypatch, 6, lambda q, t, k, h: [(f"1 + {j} = {1 + j}\n\nAnswer: {j}", True) for j in range(k)])
    out = star.main(star.Args(**dict(SMALL, iterations=1), mode="bstar", prm=str(tmp_path / "prm"), output_dir=str(tmp_path / "runs")))
    (r,) = [r for r in read_metrics(out["run_dir"]) if "star/selected" in r]
    assert r["bstar/threshold_search"] == 1.0 and r["star/selected"] > 0  # wrong answers with r_prm > τ kept (§7.10)


def test_best_iteration_and_early_stopping_follow_dev_not_test(tmp_path, monkeypatch):
    """Dev peaks at iteration 1, test at 3: the best iteration is 1 (its test accuracy is what is reported),
    --patience 2 stops after iteration 3, and test is evaluated once per evaluation point, on its own split."""
    import shared.evaluation
    _answers_by_query(monkeypatch, 6, lambda q, t, k, h: [(task.train[q].meta["solution"], True)] * k)
    task = load_task("multistep", seed=0, n_train=6, n_test=4, n_dev=4)
    curve = {"dev": [0.25, 0.75, 0.5, 0.5, 0.5], "test": [0.25, 0.25, 0.5, 1.0, 1.0]}
    seen = {"dev": [], "test": []}

    def fake_evaluate(model, tokenizer, task_, problems, *a, **k):
        split = "dev" if [p.prompt for p in problems] == [p.prompt for p in task.dev] else "test"
        assert split == "dev" or [p.prompt for p in problems] == [p.prompt for p in task.test]
        seen[split].append(1)
        return {"accuracy": curve[split][len(seen[split]) - 1], "format_rate": 1.0, "completion_len": 1.0}
    monkeypatch.setattr(shared.evaluation, "evaluate", fake_evaluate)
    out = star.main(star.Args(**dict(SMALL, iterations=5), patience=2, output_dir=str(tmp_path)))
    rows = read_metrics(out["run_dir"])
    assert [r["step"] for r in rows if "dev/accuracy" in r] == [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2, 3]
    assert out["best"] == {"iteration": 1, "dev_accuracy": 0.75, "test_accuracy": 0.25}
    last = [r for r in rows if "star/best_iteration" in r][-1]  # the final row is Run.close's peak memory
    assert last["star/best_iteration"] == 1 and last["star/best_test_accuracy"] == 0.25
    assert {p.prompt for p in task.dev}.isdisjoint({p.prompt for p in task.test + task.train})


def test_arith_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        star.main(star.Args(model="tiny", task="arith"))
    assert e.value.code == 2 and "final number only" in capsys.readouterr().err


# ---------------------------------------------------------------- smoke runs (subprocess)
TINY = ["--n-train", "6", "--n-test", "4", "--n-dev", "4", "--subset-size", "3", "--group-size", "2",
        "--max-new-tokens", "40", "--steps", "2", "--temperatures", "0.7", "1.0"]


@pytest.fixture(scope="module")
def taught_tiny(tmp_path_factory):
    """The tiny model after 150 steps on the reference solutions of 4 of the 6 training questions, so that
    greedy STaR gets those right and fine-tunes on them (a random model is always wrong and never trains)."""
    tok, model = build_tiny_tokenizer(), build_tiny_model(0)
    train = load_task("multistep", seed=0, n_train=6, n_test=1).train[:4]
    ex = [Example(q, chat_prompt(tok, p.prompt), tok(p.meta["solution"], add_special_tokens=False).input_ids + [2])
          for q, p in enumerate(train)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = build_batch(tok, ex, "cpu")
    for _ in range(150):
        sft_loss(token_logprobs(model, *batch), batch[3]).backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path_factory.mktemp("taught") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _run(args, out_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "star.py"), *args, "--output-dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_star_fine_tunes_on_its_own_right_answers(tmp_path, taught_tiny):
    _run(["--model", taught_tiny, *TINY, "--iterations", "1"], tmp_path)
    run = only_run(tmp_path)
    assert run.name.startswith("star__multistep__0__")
    rows = read_metrics(run)
    (it,) = [r for r in rows if "star/selected" in r]
    assert it["train/accuracy"] >= 3 / 6 and it["star/selected"] >= 3 and it["train/steps"] == 2  # it trained
    assert it["star/kept_wrong_step"] == 0.0 and it["star/dist_from_base"] > 0 and math.isfinite(it["train/loss"])
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [r["step"] for r in rows if "dev/accuracy" in r] == [0, 1]
    assert (run / "checkpoint" / "model.safetensors").exists() and (run / "best" / "config.json").exists()


@pytest.mark.slow
def test_smoke_bstar_searches_tau_and_trains(tmp_path, taught_tiny):
    out = _run(["--model", taught_tiny, *TINY, "--mode", "bstar", "--iterations", "2"], tmp_path)
    assert "τ searched" in out.stdout
    rows = [r for r in read_metrics(only_run(tmp_path)) if "star/selected" in r]
    assert rows[0]["star/selected"] > 0 and rows[1]["train/steps"] == 2 and rows[1]["star/init_dist"] > 0


@pytest.mark.slow
def test_bstar_interrupted_and_resumed_matches_a_straight_run(tmp_path, taught_tiny, monkeypatch):
    """Ctrl-C in iteration 2 of a 2-iteration run, then --resume: the same metrics, weights, Adam moments and
    RNG as a straight run (the cosine horizon depends on --iterations, so both legs use the same value)."""
    args = dict(model=taught_tiny, n_train=6, n_test=4, n_dev=4, subset_size=3, group_size=2, max_new_tokens=40, steps=2,
                temperatures=(0.7, 1.0), mode="bstar", iterations=2)
    straight = star.main(star.Args(**args, output_dir=str(tmp_path / "straight")))
    real, calls = star.finetune, []

    def interrupted(*a, **k):  # Ctrl-C in the second iteration, before its update
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(star, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        star.main(star.Args(**args, output_dir=str(tmp_path / "split")))
    monkeypatch.setattr(star, "finetune", real)
    run = only_run(tmp_path / "split")
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["iteration"] == 1
    star.main(star.Args(**args, resume=str(run)))
    rows_a, rows_b = ([r for r in read_metrics(d) if "star/selected" in r] for d in (straight["run_dir"], run))
    assert [r["step"] for r in rows_b] == [1, 2] and rows_a[0]["star/selected"] > 0 and rows_a[1]["train/steps"] == 2
    for ra, rb in zip(rows_a, rows_b):
        same = [k for k in ra if k.startswith(("star/", "bstar/", "train/")) and not math.isnan(ra[k])]
        assert all(ra[k] == rb[k] for k in same), {k: (ra[k], rb[k]) for k in same if ra[k] != rb[k]}
    sa, sb = (torch.load(Path(d) / "checkpoint" / "trainer_state.pt", weights_only=False) for d in (straight["run_dir"], run))
    assert sa["iteration"] == sb["iteration"] == 2 and torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert all(torch.equal(sa["optimizer"]["state"][i]["exp_avg"], sb["optimizer"]["state"][i]["exp_avg"])
               for i in sa["optimizer"]["state"])
    from safetensors.torch import load_file
    wa, wb = (load_file(Path(d) / "checkpoint" / "model.safetensors") for d in (straight["run_dir"], run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- --token-budget (subprocess)
def _spent(run):
    """{iteration: perf/gen_tokens} of the test evaluations, and the iteration rows."""
    rows = read_metrics(run)
    return {r["step"]: r["perf/gen_tokens"] for r in rows if "eval/accuracy" in r}, [r for r in rows if "star/selected" in r]


@pytest.mark.slow
def test_star_budget_stops_inside_the_generation_and_trains_on_what_it_has(tmp_path, taught_tiny):
    """Greedy rationales, 2 questions per `generate` call (≤ 80 tokens): a budget of 20 is spent by the first call,
    so iteration 1 trains on those answers only (2 SFT steps), is evaluated and saved, and ends the run. The
    Pass@K monitor (3 questions × 2 samples at T = 1) and the dev/test evaluations are not counted."""
    _run(["--model", taught_tiny, *TINY, "--iterations", "3", "--gen-batch-size", "2", "--token-budget", "20"], tmp_path)
    run = only_run(tmp_path)
    spent, (it,) = _spent(run)
    assert sorted(spent) == [0, 1] and spent[0] == 0 and 20 <= spent[1] < 20 + 2 * 40
    assert 0 < it["star/selected"] <= 2 and it["star/queries_covered"] <= 2 / 6 and it["train/steps"] == 2
    assert math.isfinite(it["star/pass_at_k"])  # the monitor ran (uncounted, not cut short)
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["iteration"] == 1


@pytest.mark.slow
def test_bstar_budget_counts_the_search(tmp_path, taught_tiny):
    """B-STaR's temperature search samples for training (it picks t and τ): it counts. K = 2 answers of one question
    per call (≤ 80 tokens); the budget of 50 runs out within the search of iteration 1, which ends the run."""
    _run(["--model", taught_tiny, *TINY, "--mode", "bstar", "--iterations", "3", "--gen-batch-size", "2",
          "--token-budget", "50"], tmp_path)
    spent, (it,) = _spent(only_run(tmp_path))
    assert sorted(spent) == [0, 1] and 50 <= spent[1] < 50 + 2 * 40 and it["star/selected"] == 0


@pytest.mark.slow
def test_star_budget_never_reached_changes_nothing(tmp_path, taught_tiny):
    strip = lambda rows: json.dumps([{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows])  # noqa: E731
    flags = ["--model", taught_tiny, *TINY, "--iterations", "2", "--gen-batch-size", "4"]
    _run(flags, tmp_path / "plain")
    _run(flags + ["--token-budget", "1000000"], tmp_path / "budget")
    plain, budget = (strip(read_metrics(only_run(tmp_path / p))) for p in ("plain", "budget"))
    assert [r["step"] for r in json.loads(plain) if "star/selected" in r] == [1, 2] and plain == budget

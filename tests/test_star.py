"""STaR / B-STaR: the spec's §8 numbers (balance score, thresholds, dedup, monitors, step schedule),
hint stripping, the loss mask, restart-from-base vs continue, in-process runs that train, and
subprocess smoke runs of both modes with resume."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import algos.star as star
from algos.star import (Example, Sample, balance_score, balance_scores, begin_iteration, build_batch, bstar_reward,
                        equations, finetune, hint_question, initial_state, monitor_metrics, n_star, prm_min_score,
                        search_config, select, sft_loss, star_collect, star_steps)
from shared.logprobs import token_logprobs
from shared.models import build_tiny_model, build_tiny_tokenizer, chat_prompt
from shared.tasks import Problem

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
def test_rationalized_examples_are_stored_without_the_hint():
    tok = build_tiny_tokenizer()
    problems = {i: Problem(f"What is {i} + 1?", str(i + 1)) for i in range(4)}
    template = "{prompt} (Hint: the answer is {answer}.)"
    prompt_fn = lambda p: chat_prompt(tok, p.prompt)  # noqa: E731
    hint_fn = lambda p: chat_prompt(tok, hint_question(p, template, "last_number"))  # noqa: E731
    calls = []

    def generate_fn(prompts):  # q0 solved directly; q1, q2 only with the hint; q3 never; q2's answer never ends
        calls.append(prompts)
        out = []
        for p in prompts:
            q = next(i for i in problems if f"What is {i} + 1?" in p)
            hinted = "Hint" in p
            ans = str(q + 1) if (q == 0 or (hinted and q in (1, 2))) else "0"
            out.append((f"so: it is {ans}", [7, q, int(hinted)], q != 2))
        return out

    verify = lambda text, p: text.endswith(p.answer)  # noqa: E731
    examples, counts = star_collect(problems, prompt_fn, hint_fn, generate_fn, verify)
    assert counts == {"solved": 1, "rationalized": 1}
    assert [e.query for e in examples] == [0, 1]
    assert len(calls) == 2 and len(calls[1]) == 3  # rationalization only for the 3 failures
    assert not any("What is 0 + 1?" in p for p in calls[1])
    for e in examples:
        assert e.prompt == prompt_fn(problems[e.query]) and "Hint" not in e.prompt and "(Hint" not in e.prompt
    assert examples[1].completion_ids == [7, 1, 1]  # the rationalized completion, under the hint-free prompt
    no_rat, c = star_collect(problems, prompt_fn, hint_fn, generate_fn, verify, rationalize=False)
    assert [e.query for e in no_rat] == [0] and c["rationalized"] == 0


def test_hint_is_the_final_answer_only():
    gsm = Problem("Tom has 3 apples...", "72", {"solution": "3 * 24 = <<3*24=72>>72\n#### 72"})
    text = hint_question(gsm, "{prompt} ({answer})", "last_number")
    assert text == "Tom has 3 apples... (72)" and "<<" not in text  # not the reference solution (pitfall 2)
    cd = Problem("Using [3, 4]...", "12", {"solution": "3 * 4", "numbers": [3, 4], "target": 12})
    assert hint_question(cd, "{prompt} ({answer})", "countdown").endswith("(3 * 4)")


# ---------------------------------------------------------------- §8.7 loss mask
def test_loss_mask_covers_exactly_the_completion_tokens():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(0, tok)
    rationales = ["Step 1: 12 + 30: 42. Answer: 42", "ok"]
    prompts = [chat_prompt(tok, "Q: what is 12 + 30?\nA:"), chat_prompt(tok, "Q: 1?")]
    ex = [Example(i, p, tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id])
          for i, (p, r) in enumerate(zip(prompts, rationales))]
    p_ids, p_mask, c_ids, c_mask = build_batch(tok, ex, "cpu")
    for row, e in enumerate(ex):
        assert c_mask[row].sum().item() == len(e.completion_ids)  # ':' inside the rationale shortens nothing
        assert c_ids[row][c_mask[row].bool()].tolist() == e.completion_ids
        assert tok.decode(p_ids[row][p_mask[row].bool()]) == e.prompt
    # the loss equals a hand-written causal-LM cross entropy over the completion tokens only
    logp = token_logprobs(model, p_ids, p_mask, c_ids, c_mask)
    loss = sft_loss(logp, c_mask)
    nll, count = 0.0, 0
    for e in ex:
        prompt = tok(e.prompt, add_special_tokens=False).input_ids
        full = torch.tensor([prompt + e.completion_ids])
        lp = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
        targets = full[0, 1:]
        tok_lp = lp[torch.arange(len(targets)), targets][len(prompt) - 1:]
        nll, count = nll - tok_lp.sum().item(), count + len(e.completion_ids)
    assert loss.item() == pytest.approx(nll / count, rel=1e-4)
    # a different question changes no target and no mask entry of the completion
    ex2 = [Example(e.query, chat_prompt(tok, "something else entirely: 99 + 1"), e.completion_ids) for e in ex]
    _, _, c_ids2, c_mask2 = build_batch(tok, ex2, "cpu")
    assert torch.equal(c_ids, c_ids2) and torch.equal(c_mask, c_mask2)


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
    acc, gen = Accelerator(cpu=True), torch.Generator().manual_seed(0)
    finetune(model, tok, ex, opt, sched, 3, args, acc, gen)  # iteration 1
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
    finetune(model, tok, ex, opt, sched, 2, args, acc, gen)
    assert {int(s["step"]) for s in opt.state.values()} == ({2} if restart else {5})


# ---------------------------------------------------------------- in-process runs that train
SMALL = dict(model="tiny", n_train=6, n_test=4, subset_size=3, group_size=2, max_new_tokens=6, steps=2,
             iterations=2, batch_size=2, temperatures=(0.7, 1.0), warmup_steps=0)


def _ending_generate(monkeypatch):
    """The random tiny model never says EOS: pretend every answer ended, so answers are selectable."""
    real = star.generate

    def fake(*a, **k):
        ro = real(*a, **k)
        ro.truncated[:] = False
        return ro
    monkeypatch.setattr(star, "generate", fake)


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_star_run_trains_then_restarts_from_base(tmp_path, monkeypatch):
    from shared.verifiers import Verdict
    _ending_generate(monkeypatch)
    import shared.tasks
    real_load = shared.tasks.load_task

    def always_right(*a, **k):  # every answer counts as correct, so STaR keeps all 6 and trains
        task = real_load(*a, **k)
        task.verify = lambda text, p: Verdict(True, True, "x")
        return task
    monkeypatch.setattr(shared.tasks, "load_task", always_right)  # `Run` loads the task through it
    out = star.main(star.Args(**SMALL, mode="star", output_dir=str(tmp_path)))
    it = [r for r in _rows(out["run_dir"]) if "star/selected" in r]
    assert [r["step"] for r in it] == [1, 2] and all(r["star/selected"] == 6 for r in it)
    assert [r["train/steps"] for r in it] == [2, 2]  # int(2 · 1.2) = 2
    assert it[0]["star/dist_from_base"] > 0 and it[1]["star/init_dist"] == 0.0  # iteration 2 began at θ_0
    assert it[0]["star/rationalized"] == 0 and it[0]["train/accuracy"] == 1.0
    state = torch.load(Path(out["run_dir"]) / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["iteration"] == 2 and {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2}


def test_bstar_with_prm_searches_threshold_and_continues(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    _ending_generate(monkeypatch)
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "prm")
    tok.save_pretrained(tmp_path / "prm")
    out = star.main(star.Args(**SMALL, mode="bstar", prm=str(tmp_path / "prm"), output_dir=str(tmp_path / "runs")))
    it = [r for r in _rows(out["run_dir"]) if "star/selected" in r]
    assert all(r["bstar/threshold_search"] == 1.0 for r in it)
    # nothing is correct, so every (t, τ) scores BS = 0 and the first (lowest t, lowest τ) wins
    assert all(r["star/temperature"] == 0.7 and r["star/threshold"] == -1.0 for r in it)
    assert all(r["star/selected"] > 0 for r in it)  # wrong answers with r_prm > −1 are kept (§7.10)
    assert it[1]["star/init_dist"] > 0  # iteration 2 continued from P_1
    state = torch.load(Path(out["run_dir"]) / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4} and state["scheduler"]["last_epoch"] == 4


# ---------------------------------------------------------------- smoke runs (subprocess)
TINY = ["--model", "tiny", "--n-train", "6", "--n-test", "4", "--subset-size", "3", "--group-size", "2",
        "--max-new-tokens", "6", "--steps", "2", "--temperatures", "0.7", "1.0"]


def _run(args, out_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "star.py"), *args, "--output-dir", str(out_dir)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _only_run(d):
    runs = [p for p in Path(d).iterdir() if p.is_dir()]
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_smoke_star(tmp_path):
    _run(TINY + ["--iterations", "1"], tmp_path)
    run = _only_run(tmp_path)
    assert run.name.startswith("star__arith__0__")
    rows = _rows(run)
    it = [r for r in rows if "star/selected" in r]
    assert len(it) == 1 and it[0]["star/selected"] == 0 and it[0]["train/steps"] == 0  # tiny is always wrong
    for key in ("star/pass_at_k", "star/pass_at_k_s", "star/diversity", "star/best_of_k", "star/reward_at_k_s",
                "star/temperature", "star/threshold", "star/balance_score", "star/rationalized", "train/accuracy"):
        assert key in it[0]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1]
    assert (run / "checkpoint" / "model.safetensors").exists() and (run / "best" / "config.json").exists()


@pytest.mark.slow
def test_smoke_bstar_and_resume_match_a_straight_run(tmp_path):
    bstar = TINY + ["--mode", "bstar"]
    straight = _run(bstar + ["--iterations", "2"], tmp_path / "straight")
    assert "threshold search is skipped" in straight.stdout
    first = _run(bstar + ["--iterations", "1"], tmp_path / "split")
    assert "threshold search is skipped" in first.stdout
    run = _only_run(tmp_path / "split")
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["iteration"] == 1
    resumed = _run(["--resume", str(run), "--iterations", "2"], tmp_path / "split")
    assert "resumed" in resumed.stdout and "after iteration 1" in resumed.stdout
    a, b = (_rows(p) for p in (_only_run(tmp_path / "straight"), run))
    assert [r["step"] for r in b if "star/selected" in r] == [1, 2]
    for ra, rb in zip(*([r for r in rows if "star/selected" in r] for rows in (a, b))):
        assert ra["bstar/threshold_search"] == 0.0
        same = [k for k in ra if k.startswith(("star/", "bstar/", "train/")) and k != "star/diversity"]
        assert all(ra[k] == rb[k] for k in same), {k: (ra[k], rb[k]) for k in same if ra[k] != rb[k]}
    sa, sb = (torch.load(_only_run(d) / "checkpoint" / "trainer_state.pt", weights_only=False)
              for d in (tmp_path / "straight", tmp_path / "split"))
    assert sa["iteration"] == sb["iteration"] == 2 and torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])

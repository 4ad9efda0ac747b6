"""PIT: the spec's §8 cases with their numbers (shared/papers/pit.md), identities with simpler methods,
the built-in preference set, and runs of every stage on the tiny model (smoke, resume after a stage
boundary and inside each stage, SIGTERM, bad flags, one process only)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import algos.pit as pit
from algos.pit import (Args, GapRewardModel, improve_chain, improvement_message, ordering_accuracy, pit_reward,
                       pit_rm_loss, references, reinforce_loss, rloo_advantages, rm_quadruple, sft_batch,
                       sft_loss, stop_index)
from shared.preferences import (Triple, builtin_triples, hh_triple, quality, tldr_triple, wrong_step_solution)
from shared.steps import check_steps
from shared.tasks import load_task
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's matrices are too small for threads: on a busy 2-core machine they only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss(r_wl, r_ww, r_ll, r_lw, dtype=torch.float64, grad=False):
    t = [torch.tensor([v], dtype=dtype, requires_grad=grad) for v in (r_wl, r_ww, r_ll, r_lw)]
    return pit_rm_loss(r_wl=t[0], r_lw=t[3], r_ww=t[1], r_ll=t[2]), t


# ---------------------------------------------------------------- §8.1–8.3 the five-term loss (Eq. 2)
@pytest.mark.parametrize("gaps, value", [((2, 0, 0, -2), 0.525862), ((0, 0, 0, 0), 5 * math.log(2)),
                                         ((-2, 0, 0, 2), 12.525862)])
def test_rm_loss_values(gaps, value):
    """(r^{w,l}, r^{w,w}, r^{l,l}, r^{l,w}) → L: 4·ln(1+e^−2) + ln(1+e^−4), 5·ln 2, and the reversed order."""
    loss, _ = _loss(*gaps)
    assert loss.item() == pytest.approx(value, abs=1e-6)


def test_rm_loss_gradients_at_zero():
    loss, (wl, ww, ll, lw) = _loss(0, 0, 0, 0, grad=True)
    loss.backward()
    assert wl.grad.item() == pytest.approx(-1.5) and lw.grad.item() == pytest.approx(1.5)
    assert ww.grad.item() == pytest.approx(0.0, abs=1e-12) and ll.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_rm_loss_is_shift_invariant_and_averages_triples():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    base = pit_rm_loss(*r.unbind(1))
    assert pit_rm_loss(*(r + 3.7).unbind(1)).item() == pytest.approx(base.item(), abs=1e-12)
    per_triple = [pit_rm_loss(*row.view(1, 4).unbind(1)).item() for row in r]
    assert base.item() == pytest.approx(sum(per_triple) / 5, abs=1e-12)


def test_rm_loss_of_a_difference_rm_is_four_bradley_terry_losses_and_one_at_twice_the_margin():
    """Identity with a standard RM: if R_PIT(x, a, b) = R(x, a) − R(x, b), then r^{w,w} = r^{l,l} = 0,
    r^{w,l} = −r^{l,w} = Δ, and Eq. 2 = 4·(−log σ(Δ)) + (−log σ(2Δ))."""
    for delta in (-1.3, 0.0, 0.4, 2.5):
        loss, _ = _loss(delta, 0.0, 0.0, -delta)
        bt = lambda d: -F.logsigmoid(torch.tensor(d, dtype=torch.float64)).item()  # noqa: E731
        assert loss.item() == pytest.approx(4 * bt(delta) + bt(2 * delta), abs=1e-12)


def test_ordering_accuracy_counts_each_of_the_five_orderings():
    r_wl, r_lw = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([-1.0, 1.0, 0.0])
    r_ww, r_ll = torch.tensor([0.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, -1.0])
    acc = ordering_accuracy(r_wl, r_lw, r_ww, r_ll)
    assert acc == pytest.approx({"wl>ww": 1 / 3, "wl>ll": 2 / 3, "wl>lw": 2 / 3, "ww>lw": 2 / 3, "ll>lw": 2 / 3})


# ---------------------------------------------------------------- §8.4 RM inputs
def test_rm_batch_is_four_inputs_in_order_and_a_fills_the_first_slot(tiny):
    from accelerate import Accelerator

    t = Triple("What is 2 + 2?", "4", "5")
    assert rm_quadruple(t) == [(t.x, "4", "5"), (t.x, "5", "4"), (t.x, "4", "4"), (t.x, "5", "5")]
    read = []
    rm = lambda ids, mask: read.extend(tiny[1].decode(i[m.bool()]) for i, m in zip(ids, mask)) or torch.zeros(len(ids))  # noqa: E731
    pit.rm_scores(rm, tiny[1], Args().rm_template, [(t.x, "FIRST", "SECOND")], 4, Accelerator(cpu=True))
    assert read[0].index(t.x) < read[0].index("Response A:\nFIRST") < read[0].index("Response B:\nSECOND")


# ---------------------------------------------------------------- §8.5 SFT masking
@pytest.fixture(scope="module")
def tiny():
    from shared.models import load_model

    return load_model("tiny", log=lambda *a: None)


def test_sft_prompt_holds_x_and_y_l_and_the_loss_sees_only_y_w(tiny):
    model, tok = tiny
    t = Triple("Solve 1 + 2 + 3.", "1 + 2 = 3\n3 + 3 = 6\nAnswer: 6", "it is about 7")
    p_ids, p_mask, c_ids, c_mask = sft_batch(tok, Args().improve_template, [t], "cpu")
    prompt = tok.decode(p_ids[0][p_mask[0].bool()])
    assert t.x in prompt and "Reference response:\nit is about 7" in prompt and t.y_w not in prompt
    target = c_ids[0][c_mask[0].bool()].tolist()
    assert target == tok(t.y_w, add_special_tokens=False).input_ids + [tok.eos_token_id]  # y_w and end of turn only
    swapped = sft_batch(tok, Args().improve_template, [Triple(t.x, t.y_l, t.y_w)], "cpu")
    assert swapped[2][0][swapped[3][0].bool()].tolist() != target  # the target changes, not just the context
    # the loss is the mean cross-entropy of y_w's tokens, computed here by hand from full logits
    logp = pit.token_logprobs(model, p_ids, p_mask, c_ids, c_mask)
    ids = torch.cat([p_ids, c_ids], 1)
    logits = model(input_ids=ids, attention_mask=torch.cat([p_mask, c_mask.long()], 1)).logits
    P = p_ids.shape[1]
    ce = F.cross_entropy(logits[0, P - 1:-1], c_ids[0], reduction="sum") / len(target)
    assert sft_loss(logp, c_mask, len(target)).item() == pytest.approx(ce.item(), rel=1e-5)


# ---------------------------------------------------------------- §8.6 a trained toy RM orders answers
def test_a_trained_toy_rm_puts_w_over_l_above_copying_above_l_over_w(tiny):
    from accelerate import Accelerator

    model, tok = tiny
    import copy

    rm = GapRewardModel(copy.deepcopy(model), seed=0).train()
    train = [Triple(f"What is {a} + {b}?", str(a + b), f"maybe {a + b + 3}, I am not sure") for a, b in
             [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (4, 4)]]
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    acc = Accelerator(cpu=True)
    items = [q for t in train for q in rm_quadruple(t)]
    for _ in range(60):
        r = pit.rm_scores(rm, tok, Args().rm_template, items, 64, acc).view(-1, 4)
        loss = pit_rm_loss(*r.unbind(1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    rm.eval()
    with torch.no_grad():
        t = train[0]
        wl, ref, lw = pit.rm_scores(rm, tok, Args().rm_template, [(t.x, t.y_w, t.y_l), (t.x, t.y_l, t.y_l),
                                                                  (t.x, t.y_l, t.y_w)], 8, acc).tolist()
    assert loss.item() < 0.5 and wl > ref > lw


# ---------------------------------------------------------------- §8.7 curriculum sources
def test_references_come_from_the_data_or_from_the_policy_model_only():
    triples = [Triple(f"x{i}", f"w{i}", f"l{i}") for i in range(4)]
    asked = []

    def policy(xs):
        asked.append(xs)
        return [f"mp({x})" for x in xs]
    assert references("data", triples, [0, 1, 2, 3], policy, False) == ["l0", "l1", "l2", "l3"]
    assert references("data", triples, [4, 5, 6, 7], policy, True) == ["l0", "w1", "l2", "w3"]  # --ref-winners
    assert asked == []  # data rounds never sample
    assert references("policy", triples, [0, 1, 2, 3], policy, False) == ["mp(x0)", "mp(x1)", "mp(x2)", "mp(x3)"]
    assert asked == [["x0", "x1", "x2", "x3"]]


# ---------------------------------------------------------------- §8.8 KL-in-reward and the RL update
def test_pit_reward_and_kl_numbers():
    gap = torch.tensor([1.0, -0.5])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    anchor = torch.tensor([[-1.5, -1.0, -9.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    reward, kl = pit_reward(gap, logp, anchor, mask, beta=0.1)
    assert kl.tolist() == pytest.approx([0.5 - 1.0, 0.0])  # Σ_t (log π − log π_SFT) on answer tokens only
    assert reward.tolist() == pytest.approx([1.0 + 0.05, -0.5])
    reward, kl = pit_reward(gap, logp, logp.clone(), mask, beta=0.1)
    assert kl.tolist() == [0.0, 0.0] and reward.tolist() == gap.tolist()


def test_rloo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 2.0, 2.0, 5.0, 0.0])
    adv = rloo_advantages(r, torch.ones(8, dtype=torch.bool), 4)
    assert adv.tolist() == pytest.approx([1 - 1, 0 - 4 / 3, 0 - 4 / 3, 3 - 1 / 3, 2 - 7 / 3, 2 - 7 / 3, 5 - 4 / 3, 0 - 3])
    # identity: with every answer valid, the leave-one-out advantage is G/(G−1) · (r − group mean)
    g = r.view(2, 4)
    assert torch.allclose(adv, (4 / 3 * (g - g.mean(1, keepdim=True))).flatten())
    valid = torch.tensor([True, False, True, True, True, False, False, False])
    adv = rloo_advantages(r, valid, 4)
    assert adv.tolist() == pytest.approx([1 - 1.5, 0, 0 - 2, 3 - 0.5, 0, 0, 0, 0])  # no valid neighbour → 0


def test_reinforce_gradient_is_advantage_times_score():
    W = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    logp = torch.log_softmax(W, -1).gather(1, tokens.T).T
    adv = torch.tensor([0.7, -1.2], dtype=torch.float64)
    reinforce_loss(logp, mask, adv, 2).backward()
    got, W.grad = W.grad.clone(), None
    logp = torch.log_softmax(W, -1).gather(1, tokens.T).T
    (-(adv[0] * (logp[0] * mask[0]).sum() + adv[1] * (logp[1] * mask[1]).sum()) / 2).backward()
    assert torch.allclose(got, W.grad) and got.abs().max() > 1e-3


def test_kl_uses_the_same_x_and_y_ref_prompt_for_policy_and_reference(tiny, monkeypatch):
    import copy

    model, tok = tiny
    seen = []
    real = pit.rollout_logprobs

    from shared.models import chat_prompt
    from shared.sampling import generate

    def spy(m, ro, rows, temperature, micro):
        seen.append((m, ro.prompt_ids.clone(), ro.prompt_mask.clone()))
        return real(m, ro, rows, temperature, micro)
    monkeypatch.setattr(pit, "rollout_logprobs", spy)
    anchor = copy.deepcopy(model)
    torch.manual_seed(0)
    message = improvement_message(Args().improve_template, "Solve 1 + 1.", "REF-TEXT")
    ro = generate(model, tok, [chat_prompt(tok, message)], n=2, max_new_tokens=6, temperature=1.0)
    logp, anchor_logp = pit.kl_logprobs(model, anchor, ro, 1.0, 8)
    assert [s[0] for s in seen] == [model, anchor]
    assert torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[0][2], seen[1][2])
    assert "REF-TEXT" in tok.decode(seen[1][1][0][seen[1][2][0].bool()])  # y_ref is in the reference's context
    assert torch.equal(logp, anchor_logp)  # §8.8: at initialisation the KL is exactly 0


# ---------------------------------------------------------------- §8.9 inference and the stop rule
def test_improve_chain_returns_k_plus_one_answers_each_prompt_holding_the_last_verbatim():
    prompts = []

    def improve(messages):
        prompts.append(messages)
        return [(m.split("Reference response:\n")[1].split("\n\n")[0] + "+", False) for m in messages]
    chain = improve_chain(["a?", "b?"], lambda xs: [("y0 of " + x, False) for x in xs], improve, Args().improve_template, 3)
    assert [[y for y, _ in c] for c in chain] == [["y0 of a?", "y0 of b?"], ["y0 of a?+", "y0 of b?+"],
                                                   ["y0 of a?++", "y0 of b?++"], ["y0 of a?+++", "y0 of b?+++"]]
    for k, messages in enumerate(prompts):
        for x, m, (y, _) in zip(["a?", "b?"], messages, chain[k]):
            assert m == improvement_message(Args().improve_template, x, y) and y in m


def test_stop_rule_keeps_the_last_answer_before_a_rewrite_that_is_no_better():
    assert stop_index([0.5, 0.2, -0.1]) == 2
    assert stop_index([0.0, 1.0, 1.0]) == 0
    assert stop_index([0.3, 0.3, 0.3]) == 3 and stop_index([]) == 0


# ---------------------------------------------------------------- the built-in preference set
@pytest.mark.parametrize("name, level", [("multistep", 1), ("multistep", 3), ("multistep", 4), ("arith", 1), ("arith", 4)])
def test_builtin_triples_prefer_the_correct_well_formed_answer(name, level):
    task = load_task(name, n_train=120, n_test=10, level=level)
    triples = builtin_triples(task, task.train, seed=0)
    assert len(triples) == 120 and len({t.kind for t in triples}) >= 3
    for t in triples:
        assert quality(task, t.problem, t.y_w) == 2 and quality(task, t.problem, t.y_l) < 2
        assert t.x == t.problem.prompt
    assert builtin_triples(task, task.train, seed=0) == triples and builtin_triples(task, task.train, seed=1) != triples


def test_wrong_step_carries_the_error_to_the_answer_and_check_steps_finds_it():
    import random

    steps = ["6 * 8 = 48", "20 - 16 = 4", "48 + 4 = 52"]
    wrong = wrong_step_solution(steps, random.Random(3))
    first = next(i for i, (a, b) in enumerate(zip(steps, wrong)) if a != b)
    report = check_steps("\n".join(wrong), [6, 8, 20, 16])
    assert report.first_error == first and wrong[-1] != steps[-1]
    assert all(c.arithmetic_ok for c in report.steps[first + 1:])  # later steps are right for the wrong value


def test_quality_grades_and_truncation():
    task = load_task("multistep", n_train=5, n_test=5, level=1)
    p = task.train[0]
    assert quality(task, p, p.meta["solution"]) == 2
    assert quality(task, p, f"I think it is {p.answer}") == 1
    assert quality(task, p, p.meta["solution"], truncated=True) == 0


def test_hub_rows_map_to_triples():
    t = hh_triple("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
                  "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5")
    assert t.x == "hi\n\nAssistant: hello\n\nHuman: 2+2?" and (t.y_w, t.y_l) == ("4", "5")
    assert hh_triple("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y") is None  # different dialogues
    row = {"info": {"post": "My cat...", "title": "Cat", "subreddit": "pets"},
           "summaries": [{"text": " cat is sad "}, {"text": "cat happy"}], "choice": 1}
    t = tldr_triple(row)
    assert "POST: My cat..." in t.x and (t.y_w, t.y_l) == ("cat happy", "cat is sad")


# ---------------------------------------------------------------- runs on the tiny model
TINY = ["--model", "tiny", "--n-train", "12", "--n-test", "4", "--batch-size", "4", "--rl-batch-size", "2",
        "--group-size", "2", "--rl-steps", "3", "--max-new-tokens", "6", "--improve-iterations", "2",
        "--score-truncated", "--rl-lr", "1e-3", "--lr", "1e-3"]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(args, out_dir, timeout=300):
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "pit.py")] + args + ["--output-dir", str(out_dir)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _state(run):
    """Everything a finished run leaves: M_PIT, M_PIT^SFT, R_PIT, the inference chains."""
    from safetensors.torch import load_file

    files = {"policy": run / "checkpoint" / "model.safetensors", "sft": run / "models" / "sft.safetensors",
             "rm": run / "models" / "rm.safetensors"}
    return {k: load_file(p) for k, p in files.items()}, {p.name: p.read_text() for p in run.glob("inference_*.jsonl")}


def _same(a, b):
    (wa, ia), (wb, ib) = a, b
    for k in wa:
        assert wa[k].keys() == wb[k].keys() and all(torch.equal(wa[k][n], wb[k][n]) for n in wa[k]), k
    assert ia and all(ia[name] == ib[name] for name in ia)  # the straight run's chains (the split one has more)


def _main(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pit.py", *argv])
    return pit.main(pit.cli(Args))


@pytest.mark.slow
def test_smoke_every_stage(tmp_path):
    out = _run([a for a in TINY if a != "--score-truncated"], tmp_path)
    run = only_run(tmp_path)
    assert run.name.startswith("pit__multistep__0__") and "R_PIT held-out ordering accuracy (heldout)" in out.stdout
    rows = read_metrics(run)
    assert sum("sft/loss" in r for r in rows) == 3 and sum("rm/loss" in r for r in rows) == 3
    rl = [r for r in rows if "train/reward" in r]
    assert [r["pit/round"] for r in rl] == [0, 0, 0, 1, 1, 1]
    for key in ("train/kl", "train/loss", "train/grad_norm", "pit/gap", "pit/copy_gap", "train/accuracy",
                "pit/true_win", "perf/gen_s", "perf/update_s", "perf/tokens_per_s"):
        assert math.isfinite(rl[0][key]), key
    # §8.8: M_PIT = M_PIT^SFT at the start of RL (up to fp32 rounding: the policy's and the reference's
    # log-probs come from differently sized batches, so the shared-prompt matmuls round differently)
    assert abs(rl[0]["train/kl"]) < 1e-6
    for r in rl:  # by default an answer cut off at --max-new-tokens earns nothing and moves nothing
        assert r["train/truncated_frac"] < 1 or (r["train/loss"] == 0.0 and r["train/grad_norm"] == 0.0)
    for k in ("heldout_init", "heldout", "train"):
        assert any(f"rm/{k}/wl>lw" in r for r in rows)
    infer = json.loads((run / "inference_2.json").read_text())
    for k in range(3):
        assert {f"infer/accuracy_k{k}", f"infer/delta_k{k}", f"infer/stop_delta_k{k}", f"infer/rm_gap_k{k}"} <= set(infer)
    chains = [json.loads(line) for line in (run / "inference_2.jsonl").read_text().splitlines()]
    assert len(chains) == 4 and all(len(c["chain"]) == 3 for c in chains)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["completed"] == ["sft", "rm", "rl0:data", "rl1:policy", "infer:2"] and not state["optimizer"]["state"]


def test_rl_rewards_score_each_answer_against_the_reference_in_its_prompt(tmp_path, monkeypatch):
    """§8.6/§8.7 inside a run: R_PIT(x, y, y_ref) gets the y_ref of y's own prompt; round 0's references are
    y_l of D, round 1's are answers of M_P (whose weights never change), never of M_PIT."""
    from shared.models import load_model

    prompts, scored, refs = [], [], []
    real_answers, real_scores, real_refs = pit.Pipeline.answers, pit.rm_scores, pit.references

    def answers(self, model, messages, n, temperature):
        ro = real_answers(self, model, messages, n, temperature)
        prompts.append((model, messages, ro.texts, n))
        return ro

    def rm_scores(rm, tok, template, items, *a):
        scored.append(items)
        return real_scores(rm, tok, template, items, *a)

    def references(source, triples, positions, sample_policy, winners):
        out = real_refs(source, triples, positions, sample_policy, winners)
        refs.append((source, triples, out))
        return out
    monkeypatch.setattr(pit.Pipeline, "answers", answers)
    monkeypatch.setattr(pit, "rm_scores", rm_scores)
    monkeypatch.setattr(pit, "references", references)
    result = _main(TINY + ["--improve-iterations", "0", "--output-dir", str(tmp_path)], monkeypatch)
    policy_model, policy = result["policy_model"], result["policy"]
    rl_samples = [p for p in prompts if p[0] is not policy_model and p[3] == 2]  # G = 2 answers per prompt
    assert len(refs) == 6 and len(rl_samples) == 6
    for (source, triples, out), (_, messages, texts, _) in zip(refs, rl_samples):
        if source == "data":
            assert out == [t.y_l for t in triples]
        else:
            made = [p for p in prompts if p[0] is policy_model and p[1] == [t.x for t in triples]]
            assert made and made[-1][2] == out  # sampled from M_P for exactly these x
        assert messages == [improvement_message(Args().improve_template, t.x, r) for t, r in zip(triples, out)]
        items = next(s for s in scored if [i[1] for i in s] == texts)  # the rewards of these answers
        assert items == [(t.x, y, r) for (t, r), y in zip([(t, r) for t, r in zip(triples, out) for _ in range(2)], texts)]
    assert all(p[0] is policy or p[0] is policy_model for p in prompts)
    fresh, _ = load_model("tiny", seed=0, log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), policy_model.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), policy.state_dict().values()))


@pytest.mark.slow
def test_resume_after_a_round_continues_the_curriculum_like_a_straight_run(tmp_path):
    _run(TINY, tmp_path / "straight")
    _run(TINY + ["--curriculum", "data"], tmp_path / "split")
    run = only_run(tmp_path / "split")
    out = _run(["--resume", str(run), "--curriculum", "data", "policy"], tmp_path / "split")
    assert "resumed" in out.stdout and (run / "inference_1.json").exists() and (run / "inference_2.json").exists()
    _same(_state(only_run(tmp_path / "straight")), _state(run))


@pytest.mark.slow
@pytest.mark.parametrize("where, call", [("sft_loss", 2), ("pit_rm_loss", 3), ("reinforce_loss", 4),
                                         ("improve_chain", 1)])
def test_an_interrupt_inside_any_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, where, call):
    """Ctrl-C raised inside an SFT update, an RM update, an RL update (round 1) and the inference stage:
    the checkpoint holds the last complete update (with R_PIT's weights and AdamW state inside stage 2)
    and the resumed run ends bit-identical to a straight one."""
    straight = _main(TINY + ["--output-dir", str(tmp_path / "a")], monkeypatch)
    kl = [r["train/kl"] for r in read_metrics(Path(straight["run_dir"])) if "train/kl" in r]
    assert abs(kl[0]) < 1e-6 and all(abs(k) > 1e-5 for k in kl[1:])  # §8.8: the KL to M_PIT^SFT grows once M_PIT moves
    real, calls = getattr(pit, where), []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pit, where, interrupt)
    with pytest.raises(KeyboardInterrupt):
        _main(TINY + ["--output-dir", str(tmp_path / "b")], monkeypatch)
    monkeypatch.setattr(pit, where, real)
    run = only_run(tmp_path / "b")
    assert "checkpoint" in [p.name for p in run.iterdir()]
    _main(["--resume", str(run)], monkeypatch)
    _same(_state(Path(straight["run_dir"])), _state(run))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_finishes(tmp_path):
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "algos" / "pit.py")] + TINY + ["--rl-steps", "400", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for a few RL updates
        runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
        if runs and sum("train/reward" in r for r in read_metrics(runs[0])) >= 3:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after stage rl0:data update" in out, out[-2000:]
    run = only_run(tmp_path)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    logged = [r["step"] for r in read_metrics(run) if "train/reward" in r]
    assert state["completed"] == ["sft", "rm"] and state["update"] >= 3 and logged[-1] == state["step"]
    _run(["--resume", str(run), "--rl-steps", str(state["update"] + 1), "--curriculum", "data"], tmp_path)
    assert json.loads((run / "inference_1.json").read_text())


# ---------------------------------------------------------------- flags and processes
@pytest.fixture
def no_model(monkeypatch):
    import shared.run

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(shared.run, "load_model", refuse)


@pytest.mark.parametrize("flags, flag", [
    (["--group-size", "1"], "--group-size"), (["--beta", "-0.1"], "--beta"), (["--task", "countdown"], "--task"),
    (["--curriculum", "nosuch"], "--curriculum"), (["--temperature", "0"], "--temperature"),
    (["--improve-template", "{prompt} only"], "--improve-template"), (["--rm-template", "{prompt}{a}{b}{c}"], "--rm-template"), (["--rl-batch-size", "0"], "--rl-batch-size"),
    (["--preferences", "nosuch"], "--preferences"), (["--infer-temperature", "-1"], "--infer-temperature")])
def test_bad_flag_exits_2_with_one_line_before_any_work(flags, flag, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.setattr(sys, "argv", ["pit.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        pit.main(pit.cli(Args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


def test_a_hub_preference_set_out_of_reach_exits_with_one_line_before_any_model(tmp_path, monkeypatch, no_model):
    import shared.tasks

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(shared.tasks, "_hub_reachable", lambda *a: False)  # as on a machine without network
    with pytest.raises(SystemExit) as e:
        pit.main(Args(model="tiny", preferences="hh-rlhf", output_dir=str(tmp_path / "runs")))
    assert "Anthropic/hh-rlhf" in str(e.value) and "--preferences builtin" in str(e.value) and "\n" not in str(e.value)


def test_several_processes_are_refused_with_one_line(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        pit.main(Args(model="tiny", output_dir=str(tmp_path / "runs")))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "one process" in err and "\n" not in err and not (tmp_path / "runs").exists()


def test_help_documents_every_flag():
    import dataclasses

    out = subprocess.run([sys.executable, str(ROOT / "algos" / "pit.py"), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 0 and "one process" in out.stdout
    lines = [line.strip("│╭╮╰╯─ ") for line in out.stdout.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("-")] + [len(lines)]
    entries = {lines[i].split()[0].rstrip(","): " ".join(lines[i:j]) for i, j in zip(starts, starts[1:])}
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} missing from --help"


# ---------------------------------------------------------------- the token budget (--token-budget)
SMALL = dict(model="tiny", n_train=12, n_test=4, batch_size=4, rl_batch_size=2, group_size=2, rl_steps=3, max_new_tokens=6,
             improve_iterations=2, score_truncated=True, rl_lr=1e-3, lr=1e-3)

REAL_UPDATE_DONE = pit.Pipeline.update_done  # the unwrapped original (each run wraps it afresh)


def _budget_run(tmp_path, monkeypatch, name, **kw):
    """An in-process run of every stage: (metrics, [(stage, count) after each update of every stage])."""
    from shared.sampling import generated_tokens
    after, real = [], REAL_UPDATE_DONE

    def counted(self, *a, **k):
        real(self, *a, **k)
        after.append((self.stage, generated_tokens()))
    monkeypatch.setattr(pit.Pipeline, "update_done", counted)
    pit.main(Args(**SMALL, output_dir=str(tmp_path / name), **kw))
    return read_metrics(only_run(tmp_path / name)), after


def _trained(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"} for r in rows
            if any(k.startswith(("sft/", "rm/", "train/")) for k in r)]


def test_token_budget_splits_over_the_rl_rounds_and_inference_is_not_counted(tmp_path, monkeypatch):
    rows, after = _budget_run(tmp_path, monkeypatch, "free")
    assert [c for s, c in after if s in ("sft", "rm")] == [0] * 6  # SFT and the reward model generate nothing
    rl = [(s, c) for s, c in after if s.startswith("rl")]
    assert [s for s, _ in rl] == ["rl0:data"] * 3 + ["rl1:policy"] * 3 and 0 < rl[0][1] < rl[1][1]
    infer = [r for r in rows if "infer/accuracy_k0" in r]
    assert [r["perf/gen_tokens"] for r in infer] == [rl[-1][1]]  # the inference chains are not counted
    budget = 2 * rl[0][1] + 1  # round 0's half is spent by its 2nd update; round 1 gets the rest
    b_rows, b_after = _budget_run(tmp_path, monkeypatch, "budget", token_budget=budget)
    b_rl = [(s, c) for s, c in b_after if s.startswith("rl")]
    assert [s for s, _ in b_rl][:3] == ["rl0:data"] * 2 + ["rl1:policy"] and 3 <= len(b_rl) < 6
    assert [c for _, c in b_rl[:2]] == [c for _, c in rl[:2]] and b_rl[-2][1] < budget <= b_rl[-1][1]  # one update over
    b_infer = [r for r in b_rows if "infer/accuracy_k0" in r]
    assert [r["perf/gen_tokens"] for r in b_infer] == [b_rl[-1][1]]  # inference still runs, after the cut rounds
    state = torch.load(only_run(tmp_path / "budget") / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["completed"] == ["sft", "rm", "rl0:data", "rl1:policy", "infer:2"]
    big_rows, _ = _budget_run(tmp_path, monkeypatch, "big", token_budget=10**9)  # never reached: the same run
    assert _trained(big_rows) == _trained(rows) and len([r for r in _trained(rows) if "train/reward" in r]) == 6

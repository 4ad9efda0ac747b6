"""MCTS-DPO: the spec's §8 numbers on a hand-built tree (prior, PUCT, backup, commit, pairs), the cDPO
loss and α, divergence slicing, the self-evaluation parse, step cutting and de-duplication, search
termination on degenerate steps, the filter, and subprocess runs (smoke, resume, SIGTERM, torchrun,
bad flags)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import algos.mcts_dpo as mcts
from algos.mcts_dpo import (Args, Node, add_child, backup, candidate, cdpo_alpha, cdpo_loss, choose_pair, commit_key,
                            confidence, cut_step, divergence, node_score, outcome, pair_rows, puct, search_question,
                            sequence_logps, simulate, step_prior, tree_batches, tree_search)
from shared.models import build_tiny_model, build_tiny_tokenizer
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
P_A, P_B = step_prior(-2.0, 4, 1.25), step_prior(-1.0, 2, 1.25)  # §8.1: 0.702189, 0.656752


# ---------------------------------------------------------------- §8.1 prior
def test_prior_is_length_normalised_log_probability():
    assert step_prior(-2.0, 4, 1.25) == pytest.approx(0.702189, abs=1e-6)
    assert step_prior(-1.0, 2, 1.25) == pytest.approx(0.656752, abs=1e-6)
    assert step_prior(-2.0, 4, 1.25) != pytest.approx(math.exp(-2.0) / 4 ** 1.25)  # not π / |a|^λ


# ---------------------------------------------------------------- §8.2–8.4, 8.11 the hand-built tree
def hand_tree():
    """Root → A (v 0.8, p_A), B (v 0.3, p_B); A → A1 (C 0.9, right), A2 (C 0.2, wrong);
    B → B1 (C 0.1, wrong), B2 (C 0.7, right). Expansion scores children with node_score."""
    spec = {"": [("A", 0.8, None, P_A), ("B", 0.3, None, P_B)],
            "A": [("A1", 0.9, True, 0.5), ("A2", 0.2, False, 0.5)],
            "B": [("B1", 0.1, False, 0.5), ("B2", 0.7, True, 0.5)]}
    calls = []

    def expand(node):
        calls.append(node.text)
        for name, C, right, p in spec[node.text]:
            O = None if right is None else outcome(right, True)
            add_child(node, Node(text=name, prior=p, C=C, terminal=right is not None, correct=right,
                                 v=node_score(C, node.v, node.depth, O)))
    return Node(), expand, calls


def test_puct_iteration_one_selects_A_and_backs_up():
    root, expand, calls = hand_tree()
    simulate(root, expand, depth_limit=3, w=1.0, gamma=1.0)
    A, B = root.children
    assert calls == ["", "A"]
    assert puct(A.r, A.prior, 1, 0, 1.0) == pytest.approx(1.502189, abs=1e-6)  # A's Q when it was selected
    assert puct(B.Q, B.prior, 1, 0, 1.0) == pytest.approx(0.956752, abs=1e-6)
    assert puct(0.42, 0.9, 0, 5, 1.0) == 0.42  # with a parent N of 0, PUCT equals Q
    A1, A2 = A.children
    assert (A1.v, A1.r, A2.v, A2.r) == pytest.approx((1.9, 1.1, -0.8, -1.6))
    assert (A1.N, A1.Q, A2.N, A2.Q) == (1, pytest.approx(1.1), 0, pytest.approx(-1.6))  # A1 was selected
    assert A.V == pytest.approx(-0.25) and A.Q == pytest.approx(0.55) and A.N == 1
    assert root.V == pytest.approx(0.425) and root.N == 2  # +1 at the start, +1 in the backup
    assert B.N == 0 and B.Q == pytest.approx(0.3)  # unvisited: Q = V(root at creation) + r


def test_puct_iteration_two_selects_B_and_commit_prefers_A_by_Q():
    root, expand, _ = hand_tree()
    simulate(root, expand, 3, 1.0, 1.0)
    A, B = root.children
    root_N_during = root.N + 1
    assert puct(A.Q, A.prior, root_N_during, A.N, 1.0) == pytest.approx(1.158113, abs=1e-6)
    assert puct(B.Q, B.prior, root_N_during, B.N, 1.0) == pytest.approx(1.437529, abs=1e-6)
    simulate(root, expand, 3, 1.0, 1.0)
    B1, B2 = B.children
    assert (B1.r, B2.r) == pytest.approx((-1.2, 1.4)) and B2.N == 1 and B1.N == 0
    assert B.V == pytest.approx(0.1) and B.Q == pytest.approx(0.4)
    assert root.V == pytest.approx(0.475) and root.N == 4
    # §8.11: both keys are N·(1+g) = 1·(1+1) = 2; A wins on Q; the root pair is A over B with α = 0.5
    assert commit_key(A, 2) == (2, pytest.approx(0.55), pytest.approx(-0.25))
    assert commit_key(B, 2) == (2, pytest.approx(0.40), pytest.approx(0.10))
    assert max(root.children, key=lambda c: commit_key(c, 2)) is A
    assert commit_key(A, 1)[0] == 1  # no (1 + g) factor with one action per node
    stats = [dict(Q=c.Q, pi=float(c is A), r=c.r, v=c.v, N=c.N) for c in root.children]
    assert choose_pair(stats) == (0, 1) and cdpo_alpha(A.N, B.N) == 0.5


def test_backup_counts_unvisited_siblings_with_weight_one():
    root = Node()
    a = add_child(root, Node(v=1.0))
    b = add_child(root, Node(v=-1.0))
    for _ in range(3):
        root.N += 1
        backup([root, a])
    assert a.N == 3 and b.N == 0
    assert root.V == pytest.approx((3 * 1.0 + 1 * -1.0) / 4)  # the bad unexplored child drags V down
    assert root.Q == 0.0  # the original root has no Q update


def test_tree_search_commits_until_terminal_and_records_stats_after_each_search():
    root, expand, _ = hand_tree()
    args = Args(simulations=2, root_multiplier=1, depth_limit=3)
    leaf, decisions = tree_search(root, expand, args)
    assert leaf.terminal and leaf.text == "A1" and [d.node.text for d in decisions] == ["", "A"]
    assert decisions[0].stats[decisions[0].chosen]["pi"] == 1.0
    assert leaf.parent is decisions[1].node


# ---------------------------------------------------------------- §8.5 node score
def test_depth_penalty_and_parse_failure_fallback():
    assert node_score(0.6, 0.0, 5, code_score=True) == pytest.approx(0.3)
    assert node_score(0.6, 0.0, 5) == pytest.approx(0.6)  # the paper: no depth penalty
    assert node_score(0.6, 0.0, 3, code_score=True) == pytest.approx(0.6)  # max(d − 3, 1) = 1
    assert node_score(0.0, 0.42, 2) == pytest.approx(0.42)  # C = 0: v = v(parent)
    assert node_score(0.9, 0.8, 1, outcome(True, True)) == pytest.approx(1.9)
    assert outcome(True, True, novel=True, code_score=True) == 1.25 and outcome(True, True, novel=True) == 1.0
    assert outcome(False, True) == -1.0 and outcome(False, False) == -1.0
    assert outcome(False, False, truncated_wrong=False) is None


# ---------------------------------------------------------------- §8.6 cDPO
def test_cdpo_loss_value_and_alpha():
    assert cdpo_alpha(3, 1) == pytest.approx(0.25)
    h = torch.tensor([2.0])
    loss, h_out = cdpo_loss(h, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([0.25]), 0.1)
    assert loss.item() == pytest.approx(0.648139, abs=1e-6) and h_out.item() == 2.0
    assert cdpo_alpha(1, 5) == 0.5  # capped
    assert cdpo_alpha(1, 5, cap=1.0) == pytest.approx(5 / 6)  # the paper's uncapped α
    assert cdpo_alpha(0, 1) == cdpo_alpha(1, 1) == 0.5  # N_w = 0 counts as 1
    assert cdpo_alpha(4, 0) == 0.0


def test_cdpo_gradient_sign():
    pi_w = torch.zeros(3, requires_grad=True)
    zero = torch.zeros(3)
    alpha = torch.tensor([0.25, 0.5, 0.5])
    pi_l = torch.tensor([0.0, 0.0, -20.0])  # the third pair already has h = 20
    loss, _ = cdpo_loss(pi_w, pi_l, zero, zero, alpha, 0.1)
    loss.sum().backward()
    g = pi_w.grad
    assert g[0] < 0  # α < 0.5: descent raises log π(y_w)
    assert g[1] == 0  # α = 0.5 at h = 0: no push
    assert g[2] > 0  # α = 0.5 at h > 0: σ(βh) − 0.5 pulls the margin back to 0 (pitfall)
    assert g[0].item() == pytest.approx(-0.1 * (0.5 - 0.25))  # ∂L/∂π_w = β(σ(βh) − 1 + α)


def test_alpha_zero_is_the_dpo_loss():
    torch.manual_seed(0)
    pw, pl, rw, rl = (torch.randn(5) for _ in range(4))
    loss, h = cdpo_loss(pw, pl, rw, rl, torch.zeros(5), 0.1)
    assert torch.allclose(loss, -F.logsigmoid(0.1 * ((pw - rw) - (pl - rl))))


# ---------------------------------------------------------------- §8.7 pairs
def test_pair_choice_and_only_child_chains():
    stats = [dict(Q=q, pi=0.0, r=0.0, v=0.0, N=1) for q in (0.2, 0.9, -0.4)]
    assert choose_pair(stats) == (1, 2)
    tied = [dict(Q=0.5, pi=p, r=0.0, v=0.0, N=1) for p in (1.0, 0.0)]
    assert choose_pair(tied) == (0, 1)  # ties broken by π, then r, v, N
    root = Node()
    a = add_child(root, Node(ids=[1, 2]))
    a1 = add_child(a, Node(ids=[3]))
    a11 = add_child(a1, Node(ids=[4, 5]))
    add_child(a11, Node(ids=[6]))
    add_child(a11, Node(ids=[7]))
    assert candidate(a) == [a, a1, a11]  # stops at the node with two children
    assert [t for n in candidate(a) for t in n.ids] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- §8.8 divergence slicing
def test_sliced_sums_give_the_same_margin_as_full_sums():
    tok = build_tiny_tokenizer()
    policy, ref = build_tiny_model(0, tok), build_tiny_model(1, tok)
    prompt = tok("Q: 7 - 5 + 8?\n", add_special_tokens=False).input_ids
    w = tok("7 - 5 = 2\n", add_special_tokens=False).input_ids
    l = tok("7 - 5 = 3\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
    k = divergence(w, l)
    assert k == len(tok("7 - 5 = ", add_special_tokens=False).input_ids) and divergence([1, 2], [1, 2, 3]) == 2
    pair = dict(prompt=prompt, chosen=w, rejected=l)
    with torch.no_grad():
        sliced = [sequence_logps(m, tok, pair_rows([pair]), 4) for m in (policy, ref)]
        full = [sequence_logps(m, tok, [(prompt, w, 0), (prompt, l, 0)], 4) for m in (policy, ref)]
    h = lambda s: (s[0][0] - s[1][0]) - (s[0][1] - s[1][1])  # noqa: E731
    assert not torch.allclose(sliced[0], full[0])  # the sums themselves differ ...
    assert h(sliced).item() == pytest.approx(h(full).item(), abs=1e-5)  # ... the margin does not


def test_sequence_logps_match_a_hand_written_forward():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(0, tok)
    prompt, comp = [5, 6, 7, 8], [9, 10, 11]
    with torch.no_grad():
        got = sequence_logps(model, tok, [(prompt, comp, 1), ([4] + prompt, comp[:2], 0)], 2)
        lp = torch.log_softmax(model(torch.tensor([prompt + comp])).logits[0].float(), -1)
        want = sum(lp[len(prompt) - 1 + t, comp[t]] for t in (1, 2))
    assert got[0].item() == pytest.approx(want.item(), abs=1e-5)


# ---------------------------------------------------------------- §8.9 self-evaluation parse
def test_confidence_reads_the_first_option_token():
    correct_ids = [1, 2]  # "B" and " B"
    probs = torch.zeros(3, 5)
    probs[1, 1], probs[1, 2], probs[1, 3] = 0.70, 0.05, 0.25
    assert confidence([" (", "B", ")"], probs, correct_ids) == pytest.approx(0.75)
    assert confidence(["N", "/", "A"], probs, correct_ids) == 0.0  # "A" at position 2 has P(correct) = 0
    assert confidence(["N/A"], probs[:1], correct_ids) == 0.0
    late = torch.zeros(2, 5)
    late[1, 1] = 0.4
    assert confidence([" x", " Cor"], late, correct_ids) == pytest.approx(0.4)  # the second pass
    assert node_score(confidence(["N/A"], probs[:1], correct_ids), 0.37, 1) == 0.37  # v inherits the parent's


def test_correct_token_ids_on_the_byte_tokenizer():
    tok = build_tiny_tokenizer()
    ids = mcts.correct_token_ids(tok)
    assert tok.convert_tokens_to_ids("B") in ids and tok.convert_tokens_to_ids("c") in ids  # first of "correct"
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------- steps: cutting, de-duplication, termination
def test_cut_step_at_the_first_line_break_after_text():
    eos = lambda pieces: [p == "<E>" for p in pieces]  # noqa: E731
    p = ["7", " -", " 5", " =", " 2", "\n", "2", " +"]
    assert cut_step(p, eos(p)) == (6, False)
    p = ["\n", "\n", "Ans", "wer", "\n", "x"]
    assert cut_step(p, eos(p)) == (5, False)  # leading blank lines belong to the step
    p = ["Answer", ": 10", "\n", " ", "<E>"]
    assert cut_step(p, eos(p)) == (5, True)  # only whitespace before EOS: the step ends the solution
    p = ["Answer", ": 10", "<E>"]
    assert cut_step(p, eos(p)) == (3, True)
    p = ["a", "b", "c"]
    assert cut_step(p, eos(p)) == (3, False)  # no line break: the whole sample


def test_sampling_stops_once_the_step_is_decided():
    tok = build_tiny_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    eos = tok.eos_token_id
    stop = mcts.StepEnd(lambda t: tok.decode([t]), [eos], start=2)
    rows = {"ab\nc": True, "ab\n ": False, "\n\nab": False, "ab": False}
    for text, decided in rows.items():  # one token after the line break decides the step
        assert stop(torch.tensor([[7, 7] + enc(text)]), None).tolist() == [decided], text
    assert stop(torch.tensor([[7, 7] + enc("abc") + [eos], [7, 7] + enc("ab\n") + [eos]]), None).tolist() == [True, True]
    model = build_tiny_model(0, tok)
    torch.manual_seed(0)
    out = mcts.sample_steps(model, tok, enc("Q: 1 + 2?"), 3, 5, 1.0, [eos], mcts.StepEnd(stop.piece, [eos], 9))
    assert len(out) == 3 and all(1 <= len(r) <= 5 for r in out)


def _fake_sampler(rows_fn):
    """`sample_steps` returning fixed token rows (cut to max_new_tokens, then after the first EOS)."""
    def fake(model, tok, prompt, n, max_new_tokens, temperature, eos, stop=None):
        rows = [r[:max_new_tokens] for r in rows_fn(n)]
        return [r[:next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]
    return fake


def _policy(monkeypatch, rows_fn, **kw):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(0, tok)
    monkeypatch.setattr(mcts, "sample_steps", _fake_sampler(rows_fn))
    from shared.tasks import load_task
    task = load_task("multistep", n_train=2, n_test=1)
    args = Args(**{"simulations": 4, "root_multiplier": 1, "max_new_tokens": 24, "step_tokens": 16, **kw})
    return mcts.Policy(model, tok, task, task.train[0], args), tok, args


def test_identical_candidate_steps_are_deduplicated(monkeypatch):
    def rows(n):
        enc = build_tiny_tokenizer()
        return [enc("1 + 2 = 3\n", add_special_tokens=False).input_ids] * (n - 1) + [enc(" 1 + 2 = 3\n", add_special_tokens=False).input_ids]
    policy, tok, args = _policy(monkeypatch, rows, n_init_actions=4)
    root = Node()
    policy.expand(root)
    assert len(root.children) == 1 and root.children[0].text == "1 + 2 = 3\n"  # same text up to whitespace
    assert policy.calls == 3  # sample, prior log-probs, self-evaluation


@pytest.mark.parametrize("row", ["  \n\n  \n   ", "", "same line\nsame line\n"])
def test_search_terminates_on_empty_or_repeated_steps(monkeypatch, row):
    tok = build_tiny_tokenizer()
    ids = tok(row, add_special_tokens=False).input_ids if row else [tok.eos_token_id]
    policy, tok, args = _policy(monkeypatch, lambda n: [ids * 8] * n, finish_depth=0)
    leaf, decisions = tree_search(Node(), policy.expand, args)
    assert leaf.terminal and len(leaf.solution_ids()) <= args.max_new_tokens
    assert policy.calls <= 3 * args.max_new_tokens  # every step has ≥ 1 token: bounded expansions
    assert all(len(d.node.children) == 1 for d in decisions)  # the same step every time: one child


# ---------------------------------------------------------------- §8.10 filter
def test_filter_drops_a_tree_whose_final_answer_is_wrong(monkeypatch):
    tok = build_tiny_tokenizer()
    wrong = [tok("Answer: 99", add_special_tokens=False).input_ids + [tok.eos_token_id],
             tok("Answer: 98", add_special_tokens=False).input_ids + [tok.eos_token_id]]
    policy, _, args = _policy(monkeypatch, lambda n: wrong[:n])
    _, decisions, pairs, stats = search_question(policy, args)
    assert len(pairs) == 1 and stats["passed_filter"] == 0.0 and stats["correct"] == 0.0
    right = [tok(f"Answer: {policy.problem.answer}", add_special_tokens=False).input_ids + [tok.eos_token_id], wrong[0]]
    policy2, _, _ = _policy(monkeypatch, lambda n: right[:n])
    _, _, pairs2, stats2 = search_question(policy2, args)
    assert stats2["passed_filter"] == 1.0 and pairs2[0]["chosen"] == right[0]  # the right answer has the higher Q
    assert tree_batches(0, 4, 1, 1, 0) == []  # no kept tree: no optimizer step


def test_tree_batches_cover_every_tree_each_epoch_in_multiples_of_the_processes():
    b = tree_batches(7, 3, 2, 1, 0)
    assert [len(x) for x in b] == [3, 3, 1, 3, 3, 1] and sorted(sum(b[:3], [])) == list(range(7))
    assert [len(x) for x in tree_batches(7, 4, 1, 2, 0)] == [4, 2]  # 3 → 2: every process gets a tree


# ---------------------------------------------------------------- runs
TINY = ["--model", "tiny", "--n-train", "8", "--n-test", "4", "--prompts-per-iteration", "2", "--max-new-tokens", "12",
        "--step-tokens", "4", "--simulations", "4", "--root-multiplier", "1", "--batch-size", "2",
        "--no-filter", "--no-conservative", "--lr", "1e-3"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(args, out_dir, cmd=None, timeout=300):
    cmd = cmd or [sys.executable, str(ROOT / "algos" / "mcts_dpo.py")]
    out = subprocess.run(cmd + args + ["--output-dir", str(out_dir)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_filter_on_the_tiny_model_makes_no_update(tmp_path):
    out = mcts.main(mcts.Args(model="tiny", n_train=8, n_test=2, prompts_per_iteration=2, iterations=1,
                              max_new_tokens=8, step_tokens=4, simulations=2, root_multiplier=1, output_dir=str(tmp_path)))
    rows = [r for r in read_metrics(Path(out["run_dir"])) if "train/updates" in r]
    assert rows[0]["train/updates"] == 0 and rows[0]["mcts_dpo/kept_trees"] == 0  # tiny is never right
    state = torch.load(Path(out["run_dir"]) / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["optimizer"]["state"] == {}  # zero optimizer contributions


@pytest.mark.parametrize("fixed", [False, True])
def test_the_reference_is_the_previous_rounds_policy_unless_fixed(tmp_path, monkeypatch, fixed):
    margins = []
    real = mcts.cdpo_loss

    def spy(*a, **k):
        loss, h = real(*a, **k)
        margins.append(h.abs().max().item())
        return loss, h
    monkeypatch.setattr(mcts, "cdpo_loss", spy)
    mcts.main(mcts.Args(model="tiny", n_train=8, n_test=2, n_dev=0, prompts_per_iteration=2, iterations=2, max_new_tokens=8,
                        step_tokens=4, simulations=2, root_multiplier=1, batch_size=2, filter=False, conservative=False,
                        lr=1e-2, fixed_reference=fixed, output_dir=str(tmp_path)))
    assert len(margins) == 2  # one update per round
    assert margins[0] < 1e-4  # round 1: π_θ = π_ref = the initial policy
    assert (margins[1] > 1e-2) if fixed else (margins[1] < 1e-4)  # round 2: π_ref = π_1 (paper) or π_0 (code)


@pytest.mark.slow
def test_smoke_one_round_two_prompts_and_resume_matches_a_straight_run(tmp_path):
    from safetensors.torch import load_file

    _run(TINY + ["--iterations", "2"], tmp_path / "straight")
    _run(TINY + ["--iterations", "1"], tmp_path / "split")
    run = only_run(tmp_path / "split")
    rows = read_metrics(run)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1] and train[0]["train/updates"] == 1 and train[0]["mcts_dpo/kept_trees"] == 2
    for key in ("mcts_dpo/tree_nodes", "mcts_dpo/pairs_per_tree", "mcts_dpo/policy_calls", "mcts_dpo/search_s",
                "train/grad_norm", "mcts_dpo/margin", "perf/step_s"):
        assert key in train[0] and math.isfinite(train[0][key])
    assert train[0]["train/grad_norm"] > 0 and [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1]
    resumed = _run(["--resume", str(run), "--iterations", "2"], tmp_path / "split")
    assert "resumed" in resumed.stdout
    a, b = only_run(tmp_path / "straight") / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert sa["iteration"] == sb["iteration"] == 2
    for k in sa["optimizer"]["state"]:
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["optimizer"]["state"][k][m], sb["optimizer"]["state"][k][m])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2]


SMALL = dict(model="tiny", n_train=8, n_test=2, n_dev=0, prompts_per_iteration=2, max_new_tokens=12, step_tokens=4,
             simulations=4, root_multiplier=1, batch_size=2)


def test_search_only_prints_one_tree(tmp_path, capsys):
    out = mcts.main(mcts.Args(**SMALL, search_only=True, output_dir=str(tmp_path)))
    text = capsys.readouterr().out
    assert "[question]" in text and "N=" in text and "policy calls" in text and "pair after" in text
    assert out["root"].N == 2 * 4 and not (Path(out["run_dir"]) / "checkpoint").exists()


def test_baseline_outcome_dpo_trains_on_a_right_and_a_wrong_answer(tmp_path, monkeypatch):
    import shared.tasks
    from shared.verifiers import Verdict

    real_load = shared.tasks.load_task

    def half_right(*a, **k):  # answers whose text has an even length are "right", so groups are mixed
        task = real_load(*a, **k)
        task.verify = lambda text, p: Verdict(True, len(text) % 2 == 0, "x")
        return task
    monkeypatch.setattr(shared.tasks, "load_task", half_right)
    real_generate = mcts.generate

    def ending(*a, **k):  # the random tiny model never says EOS: pretend its answers ended
        ro = real_generate(*a, **k)
        ro.truncated[:] = False
        return ro
    monkeypatch.setattr(mcts, "generate", ending)
    out = mcts.main(mcts.Args(**SMALL, iterations=1, baseline=True, group_size=8, lr=1e-3, output_dir=str(tmp_path)))
    run = Path(out["run_dir"])
    assert run.name.startswith("outcome_dpo__multistep__")
    row = [r for r in read_metrics(run) if "train/updates" in r][0]
    assert row["mcts_dpo/tree_nodes"] == 0 and row["mcts_dpo/pairs"] >= 1 and row["mcts_dpo/alpha"] == 0.0
    assert row["train/updates"] >= 1 and row["train/grad_norm"] > 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    cmd = [sys.executable, str(ROOT / "algos" / "mcts_dpo.py")] + TINY + [
        "--iterations", "50", "--simulations", "20", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until round 1 is logged
        runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
        if runs and any("train/loss" in r for r in read_metrics(runs[0])):
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after round" in out, out[-2000:]
    run = only_run(tmp_path)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    done = state["iteration"]
    assert done >= 1 and [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == done
    _run(["--resume", str(run), "--iterations", str(done + 1), "--simulations", "4"], tmp_path)
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == done + 1


WORKER = """
import sys, hashlib
sys.path.insert(0, {root!r})
from algos.mcts_dpo import Args, main
from shared.args import cli
out = main(cli(Args))
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", str(worker)]
    _run(TINY + ["--iterations", "1"], tmp_path / "runs", cmd=cmd)
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text()
    rows = [r for r in read_metrics(only_run(tmp_path / "runs")) if "train/loss" in r]
    assert len(rows) == 1 and rows[0]["mcts_dpo/kept_trees"] == 2 and rows[0]["train/grad_norm"] > 0


BAD_FLAGS = [(["--simulations", "0"], "--simulations"), (["--alpha-cap", "1.5"], "--alpha-cap"),
             (["--temperature", "0"], "--temperature"), (["--group-size", "1"], "--group-size"),
             (["--beta", "0"], "--beta"), (["--gamma", "2"], "--gamma"), (["--simulations", "x"], "--simulations")]


@pytest.mark.parametrize("flags, name", BAD_FLAGS)
def test_bad_flags_exit_2_with_one_line(capsys, monkeypatch, flags, name):
    from shared.args import cli

    monkeypatch.setattr(sys, "argv", ["mcts_dpo.py", *flags])
    with pytest.raises(SystemExit) as e:
        cli(Args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and name in err and "\n" not in err, err


@pytest.mark.slow
def test_a_bad_flag_stops_the_script_before_any_model_or_run_directory(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "mcts_dpo.py"), "--alpha-cap", "1.5",
                          "--output-dir", str(tmp_path)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: --alpha-cap 1.5: must be in [0, 1]", out.stderr
    assert not any(tmp_path.iterdir()) and "model:" not in out.stdout


# ---------------------------------------------------------------- the token budget (--token-budget)
REAL_SEARCH = mcts.search_question  # the unwrapped original (each run wraps it afresh)


def _budget_run(tmp_path, monkeypatch, name, iterations=2, **kw):
    """An in-process run of `iterations` rounds × 2 questions: (metrics, the count after each searched tree)."""
    from shared.sampling import generated_tokens
    after, real = [], REAL_SEARCH

    def counted(*a, **k):
        out = real(*a, **k)
        after.append(generated_tokens())
        return out
    monkeypatch.setattr(mcts, "search_question", counted)
    out = mcts.main(mcts.Args(**SMALL, iterations=iterations, filter=False, conservative=False, lr=1e-3,
                              output_dir=str(tmp_path / name), **kw))
    return read_metrics(Path(out["run_dir"])), after


def _train(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("_s") and k != "time"}
            for r in rows if "train/loss" in r]


def test_token_budget_stops_after_the_tree_that_spends_it_and_evaluation_is_not_counted(tmp_path, monkeypatch):
    rows, after = _budget_run(tmp_path, monkeypatch, "free")
    assert len(after) == 4 and 0 < after[0] < after[1] < after[2] < after[3]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["perf/gen_tokens"] for r in evals] == [0, after[1], after[3]]  # evaluations spend nothing
    budget = after[1] + 1  # spent by round 2's first tree: round 2 trains on it alone, then the run ends (not round 3)
    b_rows, b_after = _budget_run(tmp_path, monkeypatch, "budget", iterations=3, token_budget=budget)
    assert b_after == after[:3] and [r["step"] for r in b_rows if "train/loss" in r] == [1, 2]
    last = [r for r in b_rows if "eval/accuracy" in r][-1]
    assert last["step"] == 2 and budget <= last["perf/gen_tokens"] == after[2]  # overshoot: the rest of one tree
    assert (next((tmp_path / "budget").iterdir()) / "checkpoint" / "trainer_state.pt").exists()
    big_rows, _ = _budget_run(tmp_path, monkeypatch, "big", token_budget=10**9)  # never reached: the same run
    assert _train(big_rows) == _train(rows) and len(_train(rows)) == 2


def test_steps_and_self_evaluations_count_their_tokens_to_the_budget(monkeypatch):
    from shared.sampling import generated_tokens, set_generated_tokens
    tok = build_tiny_tokenizer()
    model, eos = build_tiny_model(0, tok), tok.eos_token_id
    prompt = tok("Q: 1 + 2?", add_special_tokens=False).input_ids
    set_generated_tokens(0)
    torch.manual_seed(0)
    rows = mcts.sample_steps(model, tok, prompt, 3, 5, 1.0, [eos], mcts.StepEnd(lambda t: tok.decode([t]), [eos], len(prompt)))
    assert generated_tokens() == sum(len(r) - r.count(tok.pad_token_id) for r in rows) > 0  # padding after a stop: not counted
    from shared.tasks import load_task
    task = load_task("multistep", n_train=2, n_test=1)
    policy = mcts.Policy(model, tok, task, task.train[0], Args())
    set_generated_tokens(0)
    policy.judge(["x = 1", "y = 2"])
    assert 2 <= generated_tokens() <= 8  # 4 greedy tokens at most per judgement, up to the first EOS

"""SSR-Zero: the spec's §8 cases with their numbers (score parsing, actor format, reward combination,
advantages, gradient isolation, judge prompt, online judge, eval extraction), chrF against sacreBLEU,
and subprocess runs on `--model tiny` (smoke, resume bit-identity, SIGTERM, bad flags)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import algos.ssr_zero as S
from algos.ssr_zero import (Args, Parsed, actor_prompt, build_train_prompts, chrf, cut_at_answer, grpo_loss,
                            group_advantages, guess_language, judge_prompt, parse_score, parse_translation,
                            self_rewards)
from shared.models import build_tiny_tokenizer
from shared.sampling import Rollout
from shared.translation_data import MONOLINGUAL, PARALLEL, parallel_split
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- §8.1 score parsing
@pytest.mark.parametrize("text, score, found", [
    ("<think>ok</think><answer>85</answer>", 85.0, True),
    ("<answer>Score: 92.5</answer>", 92.5, True),
    ("<answer>150</answer>", 100.0, True),  # clamped
    ("<answer>-3</answer>", 0.0, True),
    ("<think>I'd say 40</think><answer>70</answer>", 70.0, True),  # the answer block wins
    ("no number", 0.0, False),  # a judge parse failure
    ("<answer>85/100</answer>", 85.0, True),
    ("<answer>60</answer> <answer>75</answer>", 75.0, True),  # the last block
    ("<think>maybe 40</think> I give 70", 70.0, True),  # no block: after </think>
    ("<answer>excellent</answer>", 0.0, False),
    ("<think>the candidate says Score: 100</think><answer>12</answer>", 12.0, True),  # injection stays in think
])
def test_score_parse(text, score, found):
    assert parse_score(text) == (score, found)


def test_score_parse_uses_the_prefilled_think_and_bounds_its_work():
    assert parse_score(" 40 </think> 90", prefix="<think>") == (90.0, True)
    assert parse_score("x" * 10**6 + "<answer>50</answer>") == (0.0, False)  # past max_chars: not read


def test_judge_parse_failures_are_counted_by_self_rewards():
    parsed = [Parsed(True, "a", False), Parsed(True, "b", False)]
    _, scores, ok = self_rewards(parsed, lambda rows: [parse_score("no number"), parse_score("<answer>50</answer>")])
    assert scores.tolist() == [0.0, 50.0] and ok.tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- §8.2 actor format
@pytest.mark.parametrize("text, prefix, valid, answer, quoted", [
    ("<think>a</think> <answer>你好</answer>", "", True, "你好", False),
    ("<think>a</think> <answer>x", "", False, "", False),  # missing </answer>
    ("<think>a</think><answer>x</answer><answer>y</answer>", "", False, "", False),  # two answers
    ("<think>a</think><answer>x</answer> and more", "", False, "", False),  # text after </answer>
    ("<think>a</think><answer>  </answer>", "", False, "", False),  # empty answer
    ("Sure! <think>a</think><answer>x</answer>", "", False, "", False),  # text before <think>
    ("<answer>x</answer>", "", False, "", False),  # no think block
    ("<answer>x</answer><think>a</think>", "", False, "", False),  # answer before think
    ("<think></think>\n<answer> x </answer>\n", "", True, "x", False),  # empty think allowed, ŷ stripped
    ("a</think><answer>x</answer>", "<think>", True, "x", False),  # pre-filled <think>
    ('<think>a</think><answer>"Spring has come."</answer>', "", True, '"Spring has come."', True),  # kept, flagged
    ("<think>a <think> b</think><answer>x</answer>", "", False, "", False),  # two <think>
])
def test_actor_format(text, prefix, valid, answer, quoted):
    assert parse_translation(text, prefix) == Parsed(valid, answer, quoted)


def test_a_truncated_actor_output_is_malformed():
    texts = ["<think>a</think><answer>x</answer>"] * 2
    assert [p.valid for p in S.actor_parsed(texts, torch.tensor([False, True]))] == [True, False]


# ---------------------------------------------------------------- §8.3 / §8.4 reward
def test_reward_ssr_default_and_no_judge_call_for_a_bad_format():
    calls = []

    def judge(rows):
        calls.append(list(rows))
        return [(80.0, True)] * len(rows)
    parsed = [Parsed(True, "x", False), Parsed(False, "", False), Parsed(True, "y", False)]
    rewards, scores, _ = self_rewards(parsed, judge)
    assert rewards.tolist() == pytest.approx([1.8, -1.0, 1.8])
    assert calls == [[0, 2]]  # one batched call, with the valid rows only
    assert math.isnan(scores[1])
    calls.clear()
    rewards, _, _ = self_rewards([Parsed(False, "", False)] * 3, judge)
    assert rewards.tolist() == [-1.0] * 3 and calls == []


def test_reward_ssr_x():
    rewards, _, _ = self_rewards([Parsed(True, "x", False)], lambda rows: [(80.0, True)], lambda rows: [0.85])
    assert rewards.item() == pytest.approx(2.65)


# ---------------------------------------------------------------- §8.5 advantages
def test_advantages_unbiased_std():
    adv = group_advantages(torch.tensor([1.0, 0.5, 0.5, 0.0]), 4)
    assert adv.tolist() == pytest.approx([1.224742, 0.0, 0.0, -1.224742], abs=1e-6)
    assert group_advantages(torch.tensor([0.7] * 4), 4).tolist() == [0.0] * 4
    two = group_advantages(torch.tensor([1.0, 0.5, 0.5, 0.0, 0.7, 0.7, 0.7, 0.7]), 4)  # per group
    assert two[:4].tolist() == pytest.approx([1.224742, 0.0, 0.0, -1.224742], abs=1e-6) and two[4:].tolist() == [0.0] * 4


# ---------------------------------------------------------------- GRPO loss
def test_grpo_loss_value_clip_and_k3():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))  # ρ = [2, 1]
    mask = torch.ones(1, 2)
    loss, s = grpo_loss(logp, old, None, torch.tensor([1.0]), mask, epsilon=0.2, beta=0.0)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)  # ρ = 2 clipped to 1.2 for A > 0
    assert s["clip_frac"].item() == pytest.approx(0.5)
    ref = torch.log(torch.tensor([[0.25, 0.25]]))  # π_ref/π_θ = [0.5, 1]: k3 = 0.5 − log 0.5 − 1
    loss_kl, s = grpo_loss(logp, logp, ref, torch.tensor([0.0]), mask, epsilon=0.2, beta=0.1)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss_kl.item() == pytest.approx(0.1 * k3 / 2) and s["kl"].item() == pytest.approx(k3 / 2)


# ---------------------------------------------------------------- §8.6 gradient isolation
def test_gradient_only_on_actor_tokens_and_judge_text_only_changes_the_reward():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) - 2).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 1]] * 2, dtype=torch.float32)
    parsed = [Parsed(True, "x", False)] * 4

    def grads(judge_texts):
        rewards, _, _ = self_rewards(parsed, lambda rows: [parse_score(judge_texts[i]) for i in rows])
        adv = group_advantages(rewards, 4)
        assert not adv.requires_grad  # rewards and advantages are constants of the graph
        logp.grad = None
        loss, _ = grpo_loss(logp, logp.detach(), logp.detach() - 0.1, adv, mask, beta=1e-3)
        loss.backward()
        return rewards, logp.grad.clone()
    r1, g1 = grads(["<answer>90</answer>", "<answer>10</answer>", "<answer>50</answer>", "<answer>30</answer>"])
    assert (g1[mask == 0] == 0).all() and (g1[mask == 1] != 0).all()
    r2, g2 = grads(["<answer>10</answer>", "<answer>90</answer>", "<answer>50</answer>", "<answer>30</answer>"])
    assert not torch.equal(r1, r2) and (g2[mask == 0] == 0).all()


# ---------------------------------------------------------------- §8.7 judge prompt
def test_judge_prompt_content_and_swapped_languages():
    tok, args = build_tiny_tokenizer(), Args(model="tiny")
    ende = judge_prompt(tok, "The cat sleeps.", "Die Katze schläft.", "en", "de", args)
    for piece in ('"The cat sleeps."', '"Die Katze schläft."', "from English to German", "Give a score of 0",
                  "irrelevant content", "is not in German", "more than one translation", "0 to 100", "<answer>"):
        assert piece in ende, piece
    assert "reference" not in ende.lower()
    deen = judge_prompt(tok, "Die Katze schläft.", "The cat sleeps.", "de", "en", args)
    assert "from German to English" in deen and "is not in English" in deen
    assert ende.endswith("Assistant:\n") and "User:\n" in ende  # plain text (spec §5), no chat template
    assert judge_prompt(tok, "x", "y", "en", "de", Args(prefill_think=True)).endswith("Assistant:\n<think>")
    assert "<|im_start|>system" in judge_prompt(tok, "x", "y", "en", "de", Args(chat_template=True))


def test_actor_prompt_is_the_model_card_template():
    p = actor_prompt(build_tiny_tokenizer(), "Der Hund bellt.", "de", "en", Args())
    assert p.startswith("A conversation between User and Assistant.")
    assert p.endswith("User:\nTranslate the following text to English: \nDer Hund bellt.\n\nAssistant:\n")
    assert "German" not in p  # the source language is not named


# ---------------------------------------------------------------- §8.8 online judge
def test_the_judge_is_the_current_policy():
    from shared.logprobs import token_logprobs
    from shared.models import load_model
    from shared.sampling import encode_prompts

    torch.manual_seed(0)
    model, tok = load_model("tiny", log=lambda *a: None)
    args = Args(model="tiny", judge_max_new_tokens=4, judge_temperature=1.0)
    out = S.judge_scores(model, tok, [("The cat.", "Die Katze.", "en", "de")] * 3, args)
    assert len(out) == 3 and all(0 <= s <= 100 and isinstance(ok, bool) for s, ok in out)
    ids, mask = encode_prompts(tok, [judge_prompt(tok, "The cat.", "Die Katze.", "en", "de", args)])
    answer = torch.tensor([tok("<answer>80</answer>", add_special_tokens=False).input_ids])

    def judge_logp():
        with torch.no_grad():
            return token_logprobs(model, ids, mask, answer, torch.ones_like(answer, dtype=torch.float32))
    before = judge_logp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    actor = torch.tensor([tok("<think>a</think><answer>b</answer>", add_special_tokens=False).input_ids] * 2)
    cmask = torch.ones_like(actor, dtype=torch.float32)
    logp = token_logprobs(model, ids.repeat(2, 1), mask.repeat(2, 1), actor, cmask)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor([1.0, 1.0]), cmask, beta=0)
    loss.backward()
    opt.step()
    assert not torch.allclose(before, judge_logp())  # one step on the actor moved the judge


# ---------------------------------------------------------------- §8.9 eval extraction, chrF
def test_evaluation_scores_only_the_answer(monkeypatch):
    rows = parallel_split("dev")[:3]
    args = Args(model="tiny", directions=("en-de",))

    def fake_sample(model, tok, prompts, n, max_new_tokens, temperature, args, form="answer"):
        texts = []
        for p in prompts:
            ref = next(r for r in rows if r["en"] in p)["de"]
            texts.append({"answer": f"<think>{ref}</think><answer>{ref}</answer>",
                          "think": f"<think>{ref}</think><answer>\"Hallo.\"</answer>",
                          "untagged": f"Sure! {ref}"}[form])
        return Rollout(torch.zeros(len(texts), 1), None, None, None, texts, torch.zeros(len(texts), dtype=torch.bool))
    monkeypatch.setattr(S, "sample", fake_sample)
    monkeypatch.setattr(S, "judge_scores", lambda m, t, items, a: [(50.0, True)] * len(items))
    res = S.evaluate_mt(None, None, rows, args)
    assert res["chrf"] == pytest.approx(100.0) and res["format_rate"] == 1.0 and res["self_score"] == 50.0
    assert res["bleu"] == pytest.approx(100.0)
    assert res["lang_ratio"] == 1.0 and res["quote_frac"] == 0.0
    monkeypatch.setattr(S, "sample", lambda *a: fake_sample(*a, form="think"))
    res = S.evaluate_mt(None, None, rows, args)
    assert res["chrf"] < 20 and res["quote_frac"] == 1.0  # the reference in <think> earns nothing
    monkeypatch.setattr(S, "sample", lambda *a: fake_sample(*a, form="untagged"))
    res = S.evaluate_mt(None, None, rows, args)
    assert res["chrf"] == 0.0 and res["format_rate"] == 0.0 and "self_score" not in res  # malformed: empty ŷ
    assert res["bleu"] == 0.0
    assert res["chrf_lenient"] > 80  # the lenient figure reads the untagged text


def test_chrf_hand_computed():
    assert chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    # n=1: p = 2/2, r = 2/3; n=2: p = 1/1, r = 1/2; n=3: no hypothesis 3-grams (order skipped)
    # P = 1, R = 7/12, F2 = 5PR / (4P + R) = 35/55
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 35 / 55)
    assert chrf([""], ["abc"]) == 0.0
    assert chrf(["a b c"], ["abc"]) == pytest.approx(100.0)  # whitespace removed


# ---------------------------------------------------------------- helpers and data
def test_cut_at_answer_ends_the_completion_after_the_first_closing_tag():
    tok = build_tiny_tokenizer()
    ids = tok("<think>a</think><answer>x</answer> tail<answer>y</answer>", add_special_tokens=False).input_ids
    ro = Rollout(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), torch.tensor([ids]),
                 torch.ones(1, len(ids)), [tok.decode(ids)], torch.tensor([True]), tok.pad_token_id)
    cut = cut_at_answer(ro, tok)
    assert cut.texts == ["<think>a</think><answer>x</answer>"] and not cut.truncated[0]
    assert int(cut.completion_mask.sum()) == len("<think>a</think><answer>x</answer>")  # one token per byte
    assert parse_translation(cut.texts[0]).valid


def test_language_guess():
    assert guess_language("Die Katze schläft auf dem Sofa.") == "de"
    assert guess_language("The cat is sleeping on the sofa.") == "en"
    assert guess_language("Le chat dort sur le canapé.") == "fr"
    assert guess_language("12345") is None


def test_data_splits_are_held_out_and_directions_even():
    mono = {x for v in MONOLINGUAL.values() for x in v}
    assert not mono & {x for t in PARALLEL for x in t}
    assert len(parallel_split("dev")) == 16 and len(parallel_split("test")) == 32
    prompts = build_train_prompts(Args())
    directions = [f"{s}-{t}" for s, t, _ in prompts]
    assert directions.count("en-de") == directions.count("de-en") == 96
    assert {x for s, _, x in prompts if s == "en"} == set(MONOLINGUAL["en"])


# ---------------------------------------------------------------- subprocess runs on --model tiny
# The random tiny model never writes the <think>/<answer> format, so every reward would be −1 and every
# gradient zero. The runs below therefore patch `actor_parsed` to call an output well-formed when its first
# byte is even (its text as ŷ): the judge, rewards, advantages, update, logging and checkpoints all run.
WRAPPER = """
import sys
sys.path.insert(0, {root!r})
import algos.ssr_zero as S
S.actor_parsed = lambda texts, truncated, prefix="": [S.Parsed(bool(t) and ord(t[0]) % 2 == 0, t, False) for t in texts]
S.main(S.cli(S.Args))
"""
TINY = ["--model", "tiny", "--batch-size", "2", "--group-size", "4", "--max-new-tokens", "6", "--judge-max-new-tokens",
        "6", "--judge-temperature", "1", "--n-dev", "2", "--n-test", "2", "--eval-every", "1", "--save-every", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _cmd(tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    return [sys.executable, str(wrapper)]


def _run(args, out_dir, tmp_path):
    out = subprocess.run(_cmd(tmp_path) + args + ["--output-dir", str(out_dir)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_and_resume_matches_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    out = _run(TINY + ["--total-steps", "3"], straight, tmp_path)
    assert "test chrF: before" in out.stdout
    rows = read_metrics(only_run(straight))
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("train/reward", "train/format_rate", "train/kl", "train/grad_norm", "train/completion_len",
                "ssr_zero/lang_ratio", "ssr_zero/quote_frac", "ssr_zero/group_std", "ssr_zero/zero_std_frac",
                "perf/judge_s", "perf/tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in train), key
    judged = [r for r in train if r["ssr_zero/judge_calls"] > 0]
    assert judged and all(0 <= r["ssr_zero/self_score"] <= 100 and 0 <= r["ssr_zero/judge_parse_fail"] <= 1 for r in judged)
    assert any(r["train/grad_norm"] > 0 for r in train)  # the update is not trivially zero
    assert all(0 < r["ssr_zero/judge_calls"] < 8 for r in train if 0 < r["train/format_rate"] < 1)
    assert sum("dev/chrf" in r for r in rows) == sum("eval/chrf" in r for r in rows) == 4  # before + 3 steps

    _run(TINY + ["--total-steps", "1"], split, tmp_path)
    run = only_run(split)
    _run(["--resume", str(run), "--total-steps", "3"], split, tmp_path)
    a, b = only_run(straight) / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert sa["step"] == sb["step"] == 3 and sa["cursor"] == sb["cursor"]
    for k in sa["optimizer"]["state"]:
        assert torch.equal(sa["optimizer"]["state"][k]["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
        assert torch.equal(sa["optimizer"]["state"][k]["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    assert torch.equal(sa["rng"][0]["torch"], sb["rng"][0]["torch"])
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    cmd = _cmd(tmp_path) + TINY[:-4] + ["--total-steps", "500", "--eval-every", "1000", "--save-every", "1000",
                                        "--output-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until a training step is logged
        runs = [p for p in (tmp_path / "runs").glob("*") if (p / "metrics.jsonl").exists()]
        if runs and any("train/loss" in r for r in read_metrics(runs[0])):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after step" in out, out[-2000:]
    run = only_run(tmp_path / "runs")
    step = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"]
    assert step >= 1 and [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step
    _run(["--resume", str(run), "--total-steps", str(step + 1)], tmp_path / "runs", tmp_path)
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r][-1] == step + 1


@pytest.mark.parametrize("flags, flag", [
    (["--directions", "en-xx"], "--directions"), (["--directions", "en-en"], "--directions"),
    (["--group-size", "1"], "--group-size"), (["--task", "arith"], "--task"), (["--n-test", "33"], "--n-test"),
    (["--judge-temperature", "-1"], "--judge-temperature"), (["--epsilon", "1.5"], "--epsilon"),
    (["--qe-model", "/no/such/model.ckpt"], "--qe-model")])
def test_bad_flags_exit_2_with_one_line_before_any_work(flags, flag, tmp_path, monkeypatch, capsys):
    import shared.run
    from shared.args import cli

    monkeypatch.setattr(shared.run, "load_model", lambda *a, **k: pytest.fail("model loaded before the flags were checked"))
    monkeypatch.setattr(sys, "argv", ["ssr_zero.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        S.main(cli(Args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_command_line_bad_flag_and_help(tmp_path):
    script = str(ROOT / "algos" / "ssr_zero.py")
    out = subprocess.run([sys.executable, script, "--batch-size", "0", "--output-dir", str(tmp_path / "runs")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.strip() == "error: --batch-size 0: must be > 0"
    assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "one process" in out.stdout and "--judge-temperature" in out.stdout


# ---------------------------------------------------------------- --token-budget (subprocess)
@pytest.mark.slow
def test_token_budget_ends_the_run_and_counts_the_judge_but_no_evaluation(tmp_path):
    """Per step: 8 actor answers (train/completion_len each) and one judge pass of ≥ 1, ≤ 6 tokens per judge call
    count; the evaluations (greedy actor and its self-judge on dev and test) do not."""
    _run(TINY[:-2] + ["--save-every", "1000", "--total-steps", "50", "--token-budget", "150"], tmp_path / "runs", tmp_path)
    run = only_run(tmp_path / "runs")
    rows = read_metrics(run)
    train = {r["step"]: r for r in rows if "train/loss" in r}
    spent = {r["step"]: r["perf/gen_tokens"] for r in rows if "eval/chrf" in r}
    assert [(r["step"], r["perf/gen_tokens"]) for r in rows if "dev/chrf" in r][0] == (0, 0) and spent[0] == 0
    last = max(train)
    assert sorted(spent) == list(range(last + 1)) and 1 < last < 50 and spent[last - 1] < 150 <= spent[last]
    for s, r in train.items():
        actor, calls = round(r["train/completion_len"] * 8), r["ssr_zero/judge_calls"]
        assert actor + calls <= spent[s] - spent[s - 1] <= actor + 6 * calls
    assert any(r["ssr_zero/judge_calls"] > 0 for r in train.values())
    assert torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == last


@pytest.mark.slow
def test_token_budget_never_reached_changes_nothing(tmp_path):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]  # noqa: E731
    _run(TINY + ["--total-steps", "2"], tmp_path / "plain", tmp_path)
    _run(TINY + ["--total-steps", "2", "--token-budget", "1000000"], tmp_path / "budget", tmp_path)
    plain, budget = (strip(read_metrics(only_run(tmp_path / p))) for p in ("plain", "budget"))
    assert [r["step"] for r in plain if "train/loss" in r] == [1, 2] and plain == budget

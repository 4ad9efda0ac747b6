"""SFT: the loss on hand-made logits, the batches (prompt as evaluation renders it, answer ending with EOS),
reference answers that the task's verifier accepts, bad flags, and subprocess runs on the tiny model
(smoke, the token budget, resume)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from algos.sft import REFERENCES, Args, main, sft_batch, sft_loss
from shared.args import cli
from shared.models import build_tiny_tokenizer, chat_prompt
from shared.rollouts import PromptStream
from shared.sampling import encode_prompts
from shared.tasks import Task, _gsm8k_problem, load_task
from tests.helpers import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the loss
def _hand_made():
    """Two rows over a 3-token vocabulary. Row 0: prompt [1, 2], answer [0, 1]. Row 1: prompt [1], answer
    [0, 2], one padding column. Logits at the four positions that predict answer tokens are set by hand;
    every other position (predicting a prompt token, padding, or nothing) holds noise."""
    ids = torch.tensor([[1, 2, 0, 1], [1, 0, 2, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)) * 5
    ln2, ln3 = math.log(2), math.log(3)
    logits[0, 1] = torch.tensor([ln2, 0, 0])  # predicts 0: p = 2/4, hit
    logits[0, 2] = torch.tensor([ln2, 0, 0])  # predicts 1: p = 1/4, miss
    logits[1, 0] = torch.tensor([ln2, 0, 0])  # predicts 0: p = 2/4, hit
    logits[1, 1] = torch.tensor([0, 0, ln3])  # predicts 2: p = 3/5, hit
    return logits, ids, loss_mask


def test_loss_is_the_hand_computed_token_mean_cross_entropy():
    logits, ids, loss_mask = _hand_made()
    loss, stats = sft_loss(logits, ids, loss_mask)
    expected = (math.log(2) + math.log(4) + math.log(2) + math.log(5 / 3)) / 4  # = ln(80/3) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["token_accuracy"].item() == pytest.approx(3 / 4)
    # the normaliser of a larger batch (other micro-batches or processes) divides the same sum
    assert sft_loss(logits, ids, loss_mask, num_tokens=torch.tensor(8))[0].item() == pytest.approx(expected / 2, abs=1e-6)


def test_loss_ignores_prompt_and_padding_positions():
    logits, ids, loss_mask = _hand_made()
    logits.requires_grad_(True)
    loss, _ = sft_loss(logits, ids, loss_mask)
    loss.backward()
    scored = torch.zeros(2, 4, dtype=torch.bool)
    scored[0, 1] = scored[0, 2] = scored[1, 0] = scored[1, 1] = True
    assert (logits.grad[~scored] == 0).all() and (logits.grad[scored].abs().sum(-1) > 0).all()
    # other logits, and other tokens at prompt and padding positions, leave the loss unchanged
    noisy, other_ids = logits.detach().clone(), ids.clone()
    noisy[~scored] += 100 * torch.randn(int((~scored).sum()), 3)
    other_ids[0, :2] = torch.tensor([2, 0])  # the prompt of row 0 ...
    other_ids[1, 3] = 2  # ... and the padding of row 1
    assert sft_loss(noisy, other_ids, loss_mask)[0].item() == pytest.approx(loss.item(), abs=1e-6)


# ---------------------------------------------------------------- batches and references
@pytest.mark.parametrize("pad_is_eos", [False, True])  # SmolLM2 pads with its EOS
def test_batch_prompt_as_evaluation_renders_it_answer_ends_with_eos(pad_is_eos):
    tokenizer = build_tiny_tokenizer()
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    task = load_task("multistep", n_train=5, n_test=1, level=1)
    problems = task.train[:3] + [load_task("multistep", n_train=1, n_test=1, level=4).train[0]]  # lengths differ
    ids, attention, loss_mask = sft_batch(tokenizer, task, problems)
    assert len({int(m.sum()) for m in attention}) > 1  # some rows are padded
    for i, p in enumerate(problems):
        n, start = int(attention[i].sum()), int(loss_mask[i].argmax())
        assert attention[i, :n].all() and not attention[i, n:].any() and (ids[i, n:] == tokenizer.pad_token_id).all()
        assert loss_mask[i, start:n].all() and not loss_mask[i, :start].any() and not loss_mask[i, n:].any()
        answer = ids[i, start:n].tolist()
        assert answer[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in answer[:-1]
        assert tokenizer.decode(answer[:-1]) == p.meta["solution"] and p.meta["solution"].endswith(f"Answer: {p.answer}")
        prompt_ids, _ = encode_prompts(tokenizer, [chat_prompt(tokenizer, p.prompt, task.system_prompt)])
        assert ids[i, :start].tolist() == prompt_ids[0].tolist()  # the tokens `generate` continues at evaluation


@pytest.mark.parametrize("name, level", [("arith", 1), ("arith", 5), ("multistep", 1), ("multistep", 4),
                                         ("countdown", 1), ("countdown", 2)])
def test_every_reference_answer_is_graded_correct(name, level):
    task = load_task(name, n_train=40, n_test=1, level=level)
    for p in task.train:
        verdict = task.verify(REFERENCES[name](p), p)
        assert verdict.correct and verdict.format_ok, (p.prompt, REFERENCES[name](p))


def test_gsm8k_reference_drops_calculator_annotations_and_ends_with_the_answer_line():
    p = _gsm8k_problem({"question": "How many?", "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n"
                                                           "And 1000+24 = <<1000+24=1024>>1,024 in all.\n#### 1,024"})
    text = REFERENCES["gsm8k"](p)
    assert text == "She sold 48/2 = 24 in May.\nAnd 1000+24 = 1,024 in all.\nAnswer: 1024"
    assert Task("gsm8k", [], [], None, mode="answer_or_last_number").verify(text, p).correct


# ---------------------------------------------------------------- bad flags: one line, before anything loads
@pytest.mark.parametrize("flags, expected", [
    (["--task", "math500"], "--task math500: SFT needs reference answers"),
    (["--task", "countdown-hf"], "--task countdown-hf: SFT needs reference answers"),
    (["--batch-size", "0"], "--batch-size 0: must be > 0"), (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be > 0")])
def test_bad_flag_exits_2_with_one_line_before_loading_anything(flags, expected, tmp_path, monkeypatch, capsys):
    import shared.run

    def refuse(*a, **k):
        raise AssertionError("something was loaded before the flags were checked")
    monkeypatch.setattr(shared.run, "load_model", refuse)
    monkeypatch.setattr(shared.run, "load_task_checked", refuse)
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        main(cli(Args))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: " + expected) and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- subprocess runs on the tiny model
TINY = ["--model", "tiny", "--task", "multistep", "--batch-size", "4", "--n-train", "64", "--n-test", "8",
        "--n-dev", "0", "--max-new-tokens", "8"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run(args, tmp_path, rc=0):
    out = subprocess.run([sys.executable, str(ROOT / "algos" / "sft.py")] + args + ["--output-dir", str(tmp_path)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _target_tokens(steps, batch_size=4):
    """The answer tokens (EOS included) of the first `steps` batches of TINY's seeded training order."""
    task, tokenizer = load_task("multistep", seed=0, n_train=64, n_test=8, level=1), build_tiny_tokenizer()
    stream = PromptStream(len(task.train), 0)
    return [int(sft_batch(tokenizer, task, [task.train[i] for i in stream.take(batch_size)])[2].sum())
            for _ in range(steps)]


@pytest.mark.slow
def test_command_line_bad_task_exits_2_with_one_line(tmp_path):
    out = _run(["--task", "math500"], tmp_path / "runs", rc=2)
    assert out.stdout == "" and out.stderr.strip().splitlines() == [out.stderr.strip()] and "--task math500" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_smoke_learns_and_writes_metrics_and_a_loadable_checkpoint(tmp_path):
    from shared.models import load_model

    _run(TINY + ["--total-steps", "3", "--eval-every", "2", "--save-every", "2", "--lr", "1e-3"], tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    train, evals = [r for r in rows if "train/loss" in r], [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and [r["step"] for r in evals] == [0, 2, 3]
    for key in ("train/loss", "sft/token_accuracy", "train/grad_norm", "sft/target_tokens", "perf/step_s"):
        assert math.isfinite(train[0][key])
    assert train[-1]["train/loss"] < train[0]["train/loss"] - 0.3  # it learns (lr 1e-3 on a random model)
    assert [r["sft/target_tokens"] for r in train] == _target_tokens(3)
    assert evals[0]["perf/gen_tokens"] == 0  # evaluation is not counted
    assert evals[-1]["perf/gen_tokens"] == sum(_target_tokens(3))
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["cursor"] == 12 and state["optimizer"]["state"]
    model, _ = load_model(str(run / "checkpoint"))
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.slow
def test_token_budget_ends_the_run_after_the_step_that_reaches_it(tmp_path):
    budget = 600
    _run(TINY + ["--total-steps", "50", "--eval-every", "100", "--save-every", "100", "--token-budget", str(budget)],
         tmp_path)
    run = only_run(tmp_path)
    rows = read_metrics(run)
    train, evals = [r for r in rows if "train/loss" in r], [r for r in rows if "eval/accuracy" in r]
    last = len(train)
    expected = _target_tokens(last)
    assert 1 < last < 50 and [r["step"] for r in train] == list(range(1, last + 1))
    assert sum(expected[:-1]) < budget <= sum(expected)  # stopped at the first step that reached it: one batch over
    assert [r["perf/gen_tokens"] for r in train] == [sum(expected[:k + 1]) for k in range(last)]
    assert [r["step"] for r in evals] == [0, last]  # the run ends as after its last step: a final evaluation ...
    assert evals[0]["perf/gen_tokens"] == 0 and evals[-1]["perf/gen_tokens"] == sum(expected) >= budget
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)  # ... and a checkpoint
    assert state["step"] == last and state["gen_tokens"] == [sum(expected)]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run_and_an_unreached_budget_changes_nothing(tmp_path):
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    flags = TINY + ["--eval-every", "2", "--save-every", "2"]
    _run(flags + ["--total-steps", "4", "--token-budget", str(10**9)], straight)  # a budget never reached
    _run(flags + ["--total-steps", "2"], split)
    run = only_run(split)
    _run(["--resume", str(run), "--total-steps", "4"], split)
    a, b = only_run(straight) / "checkpoint", run / "checkpoint"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "trainer_state.pt", weights_only=False) for p in (a, b))
    assert sa["step"] == sb["step"] == 4 and sa["cursor"] == sb["cursor"] == 16 and sa["gen_tokens"] == sb["gen_tokens"]
    for k in sa["optimizer"]["state"]:
        assert torch.equal(sa["optimizer"]["state"][k]["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])

    def numbers(run_dir):
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/") or k == "perf/gen_tokens"}
                for r in read_metrics(run_dir) if "train/loss" in r or "eval/accuracy" in r]
    assert numbers(only_run(straight)) == numbers(run)  # same losses, grad norms, token counts, evaluations


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resume_continues(tmp_path):
    import signal
    import time

    cmd = [sys.executable, str(ROOT / "algos" / "sft.py")] + TINY + [
        "--total-steps", "100000", "--eval-every", "100000", "--save-every", "100000", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a training step is logged
        runs = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
        if runs and any("train/loss" in r for r in read_metrics(runs[0])):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "interrupted after step" in out, out[-2000:]
    run = only_run(tmp_path)
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=False)
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert state["step"] >= 1 and train[-1]["step"] == state["step"]  # nothing logged was lost
    assert state["cursor"] == 4 * state["step"] and state["gen_tokens"] == [train[-1]["perf/gen_tokens"]]
    _run(["--resume", str(run), "--total-steps", str(state["step"] + 1)], tmp_path)
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert train[-1]["step"] == state["step"] + 1
    assert train[-1]["sft/target_tokens"] == _target_tokens(state["step"] + 1)[-1]  # the next batch in the order


WORKER = """
import sys
sys.path.insert(0, {root!r})
from algos.sft import Args, main
from shared.args import cli
main(cli(Args))
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """The batch is split across processes with a global token normaliser: the same losses, gradient norms
    and token counts as one process on the whole batch (up to float summation order)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT)))
    flags = TINY + ["--total-steps", "2", "--eval-every", "2", "--save-every", "2"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", str(worker)] + flags + ["--output-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _run(flags, tmp_path / "one")
    two, one = ([r for r in read_metrics(only_run(tmp_path / d)) if "train/loss" in r] for d in ("two", "one"))
    assert [r["step"] for r in two] == [1, 2]  # logged once, by the main process
    for a, b in zip(two, one):
        assert a["sft/target_tokens"] == b["sft/target_tokens"] and a["perf/gen_tokens"] == b["perf/gen_tokens"]
        for key in ("train/loss", "train/grad_norm", "sft/token_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key

"""Run plumbing: resumed args, metrics file, atomic checkpoints, RNG round trip, the prompt stream."""

import random
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from shared.models import load_model
from shared.rollouts import PromptStream
from shared.run import (MetricsLogger, load_checkpoint, merge_resumed_args, read_metrics, rng_state,
                        save_args, save_checkpoint, set_rng_state)


@dataclass
class A:
    total_steps: int = 10
    lr: float = 1e-5
    resume: str | None = None


def test_resumed_args_keep_saved_values_unless_a_flag_is_given(tmp_path, monkeypatch):
    save_args(tmp_path, A(total_steps=3, lr=0.5))
    monkeypatch.setattr(sys, "argv", ["x", "--resume", str(tmp_path)])
    merged = merge_resumed_args(tmp_path, A(resume=str(tmp_path)), A)
    assert (merged.total_steps, merged.lr, merged.resume) == (3, 0.5, str(tmp_path))
    # a flag given explicitly wins even when it equals the default
    monkeypatch.setattr(sys, "argv", ["x", "--resume", str(tmp_path), "--total-steps", "10"])
    assert merge_resumed_args(tmp_path, A(resume=str(tmp_path)), A).total_steps == 10
    # Python callers: a non-default field wins
    monkeypatch.setattr(sys, "argv", ["x"])
    assert merge_resumed_args(tmp_path, A(lr=0.1, resume=str(tmp_path)), A).lr == 0.1
    with pytest.raises(SystemExit, match="not a run directory"):
        merge_resumed_args(tmp_path / "nope", A(), A)


def test_metrics_logger_appends_json_lines(tmp_path):
    for start in (1, 3):  # a resumed run appends to the same file
        log = MetricsLogger(tmp_path)
        log.log({"train/loss": torch.tensor(0.5), "eval/accuracy": 1}, step=start)
        log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 3] and rows[0]["train/loss"] == 0.5
    MetricsLogger(tmp_path / "other", enabled=False).log({"x": 1}, 0)  # non-main processes write nothing
    assert not (tmp_path / "other").exists()


def test_checkpoint_round_trip_and_atomic_swap(tmp_path):
    model, tok = load_model("tiny", device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 5, 7]])).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, tok, {"step": 1, "optimizer": opt.state_dict()})
    (tmp_path / "checkpoint.tmp").mkdir()  # debris of a save killed half-way must not matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_checkpoint(tmp_path, model, tok, {"step": 2, "optimizer": opt.state_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    fresh, _ = load_model("tiny", device="cpu", seed=1)
    state = load_checkpoint(tmp_path, fresh)
    assert state["step"] == 2
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(SystemExit, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing", fresh)


def test_rng_state_round_trip():
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_prompt_stream_is_seeded_resumable_and_covers_each_epoch():
    a = PromptStream(10, seed=3)
    first = a.take(25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert first[:10] != first[10:20]  # a new permutation every epoch
    b = PromptStream(10, seed=3)
    b.take(7)
    resumed = PromptStream(10, seed=3, cursor=b.cursor)
    assert b.take(5) == resumed.take(5) == first[7:12]
    assert PromptStream(10, seed=4).take(10) != first[:10]


def _bare_run():
    from shared.run import Run

    run = Run.__new__(Run)  # only the signal bookkeeping, no accelerator or run directory
    run._atomic, run._pending, run.log = 0, None, lambda *a, **k: None
    return run


def test_a_signal_during_an_update_is_held_until_the_update_ends():
    run = _bare_run()
    done = []
    with pytest.raises(KeyboardInterrupt):
        with run.atomic():
            run._on_signal(15, None)  # SIGTERM arrives mid-update: noted, not raised
            with run.atomic():  # nested blocks hold it too
                done.append("inner")
            done.append("rest of the update")
    assert done == ["inner", "rest of the update"] and run._atomic == 0


def test_a_second_signal_while_one_is_pending_aborts_at_once():
    run = _bare_run()
    done = []
    with pytest.raises(KeyboardInterrupt):
        with run.atomic():
            run._on_signal(2, None)
            run._on_signal(2, None)  # Ctrl-C twice: do not wait
            done.append("never")
    assert done == []


def test_a_signal_outside_an_update_interrupts_at_once_and_pending_is_raised_once():
    run = _bare_run()
    with pytest.raises(KeyboardInterrupt):
        run._on_signal(15, None)
    with pytest.raises(KeyboardInterrupt):
        with run.atomic():
            run._on_signal(15, None)
            finished = True
    assert finished and run._pending is None
    with run.atomic():  # nothing pending any more: the next block ends normally
        pass


def _setup(tmp_path, dtype, **kw):
    from accelerate.state import AcceleratorState

    from shared.args import StepArgs
    from shared.run import Run

    AcceleratorState._reset_state(reset_partial_state=True)  # one process, several precisions in a row

    run = Run("test", StepArgs(model="tiny", dtype=dtype, output_dir=str(tmp_path), n_train=8, n_test=2, n_dev=2, **kw))
    return run, run.setup_lm(reference=True)


def _one_step(lm, seen_dtypes):
    layer = lm.policy.model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda m, i, o: seen_dtypes.append(o.dtype))
    before = [p.detach().clone() for p in lm.params]
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    loss = lm.model(input_ids=ids).logits.float().logsumexp(-1).mean()
    lm.accelerator.backward(loss)
    lm.optimizer.step()
    handle.remove()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(lm.params, before))
    return changed / sum(p.numel() for p in lm.params)  # share of weights the step moved


def test_bf16_mixed_runs_forward_in_bf16_and_keeps_fp32_master_weights_that_move(tmp_path):
    run, lm = _setup(tmp_path / "mixed", "bf16-mixed", lr=1e-5)
    seen = []
    moved = _one_step(lm, seen)
    assert seen == [torch.bfloat16]  # the forward ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in lm.params)  # master weights and Adam moments in fp32
    assert all(s["exp_avg"].dtype == torch.float32 for s in lm.optimizer.state.values())
    assert moved > 0.99  # an lr-1e-5 Adam step moves (almost) every weight
    for model in (lm.ref_copy, run.frozen_copy(lm)):  # references run in the same precision
        out = []
        h = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: out.append(o.dtype))
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 40, 41]]))
        h.remove()
        assert out == [torch.bfloat16] and all(not p.requires_grad for p in model.parameters())
    run.close()


def test_pure_bf16_weights_round_small_updates_away(tmp_path):
    """Why fp32 master weights: the same lr-1e-5 step leaves most bf16 weight tensors unchanged."""
    run, lm = _setup(tmp_path / "bf16", "bf16", lr=1e-5)
    moved = _one_step(lm, [])
    assert all(p.dtype == torch.bfloat16 for p in lm.params)
    assert moved < 0.2  # weights of size 0.02 and 1.0 are below bf16's resolution for a 1e-5 step
    run.close()
    run, lm = _setup(tmp_path / "fp32", "fp32", lr=1e-5)
    seen = []
    assert _one_step(lm, seen) > 0.99 and seen == [torch.float32]
    run.close()


def test_token_budget_counts_training_generations_resumes_the_count_and_logs_peak_memory(tmp_path):
    from shared.sampling import count_generated, generated_tokens, set_generated_tokens

    set_generated_tokens(123)
    run, lm = _setup(tmp_path, "fp32", token_budget=50)
    assert generated_tokens() == 0 and run.budget_left()  # a new run starts its own count
    count_generated(49)
    assert run.budget_left() and run.tokens_spent() == 49
    run.evaluate(lm, 1, max_new_tokens=4)  # evaluation generates, but does not spend the budget
    assert run.tokens_spent() == 49
    count_generated(1)
    assert not run.budget_left()
    run.save(lm, step=1)
    run.close()
    rows = read_metrics(run.dir)
    assert rows[0]["perf/gen_tokens"] == 49 and rows[0]["step"] == 1
    assert rows[-1]["step"] == 1 and 0.05 < rows[-1]["perf/peak_rss_gb"] < 64
    set_generated_tokens(0)
    resumed = _resumed_run(tmp_path, run.dir)
    assert generated_tokens() == 50 and not resumed.budget_left()
    set_generated_tokens(0)


def _resumed_run(tmp_path, run_dir):
    from shared.args import StepArgs
    from shared.run import Run

    run = Run("test", StepArgs(model="tiny", dtype="fp32", output_dir=str(tmp_path), n_train=8, n_test=2, n_dev=2,
                               token_budget=50, resume=str(run_dir)))
    run.setup_lm(reference=True)
    return run

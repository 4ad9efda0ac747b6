"""shared/rollouts.py: group sampling with a keep filter, in one process and across two."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.models import load_model
from shared.rollouts import PromptStream, sample_groups
from shared.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]


class OneProcess:
    num_processes, process_index, device = 1, 0, torch.device("cpu")

    @staticmethod
    def reduce(t, reduction):
        return t.clone()


def test_keep_filter_take_and_fill():
    model, tok = load_model("tiny", device="cpu", log=lambda *a: None)
    task = load_task("arith", n_train=40, n_test=1)
    decisions = iter([[True, False], [False, False], [False, True]])  # kept flags per generated batch
    torch.manual_seed(0)
    groups = sample_groups(OneProcess(), model, tok, task, PromptStream(40, 0), batch_size=2, group_size=3,
                           max_new_tokens=4, temperature=1.0, keep=lambda c: torch.tensor(next(decisions)),
                           max_gen_batches=3)
    assert groups.gen_batches == 3 and groups.kept.tolist() == [True, False, False, False, False, True]
    assert len(groups.problems) == 6 and len(groups.rollout) == 18 and groups.dropped_frac == pytest.approx(4 / 6)
    two = groups.take(2)
    assert two.problems == [groups.problems[0], groups.problems[5]] and len(two.rollout) == 6
    assert two.rollout.texts == groups.rollout.texts[:3] + groups.rollout.texts[15:]
    assert len(groups.take(3).problems) == 2  # not filled unless asked
    filled = groups.take(3, fill_with_rejected=True)
    assert filled.problems == [groups.problems[i] for i in (0, 1, 5)] and filled.kept.tolist() == [True, False, True]
    assert torch.equal(filled.correct, groups.correct[[0, 1, 2, 3, 4, 5, 15, 16, 17]])


WORKER = """
import sys, json, torch
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from shared.models import load_model
from shared.rollouts import PromptStream, sample_groups
from shared.tasks import load_task
acc = Accelerator(cpu=True)
model, tok = load_model("tiny", device="cpu", log=lambda *a: None)
task = load_task("arith", n_train=64, n_test=1)
calls = [0]
def keep(correct):  # rank 1 rejects every group of its first batch; everything else is kept
    calls[0] += 1
    n = len(correct) // 4
    ok = not (acc.process_index == 1 and calls[0] == 1)
    return torch.full((n,), ok, dtype=torch.bool)
torch.manual_seed(acc.process_index)
g = sample_groups(acc, model, tok, task, PromptStream(64, 0), batch_size=4, group_size=4, max_new_tokens=3,
                  temperature=1.0, keep=keep, max_gen_batches=5)
json.dump({{"batches": g.gen_batches, "kept": int(g.kept.sum())}}, open({out!r} + f"/rank{{acc.process_index}}.json", "w"))
"""


@pytest.mark.slow
def test_two_processes_keep_generating_until_the_short_one_has_enough(tmp_path):
    """accelerate's reduce has no "min" (it sums): with kept counts 2 and 0 both processes used to see 2
    and stop, and the short one trained on rejected groups."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29521", str(worker)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["batches"] == r1["batches"] == 2  # both ran a second batch, in lockstep
    assert r1["kept"] >= 2 and r0["kept"] >= 2


def test_truncated_answers_are_wrong_unless_graded_on_their_text():
    """A 24-token answer cut off mid-way can still end in the right number; by default it is wrong."""
    from shared.verifiers import Verdict

    model, tok = load_model("tiny", device="cpu", log=lambda *a: None)
    task = load_task("arith", n_train=8, n_test=1)
    task.verify = lambda text, p: Verdict(True, True, text)  # every text "matches"
    for grade, expected in ((False, 0.0), (True, 1.0)):
        torch.manual_seed(0)
        g = sample_groups(OneProcess(), model, tok, task, PromptStream(8, 0), batch_size=2, group_size=4,
                          max_new_tokens=3, temperature=1.0, grade_truncated=grade)
        assert g.truncated.any()
        assert (g.correct[g.truncated] == expected).all() and (g.correct[~g.truncated] == 1.0).all()

"""scripts/benchmark.py: the table and interval code on synthetic run directories (numbers by hand),
the command lines it builds (same flags for every method, --resume from a checkpoint), and a --quick
smoke run on the tiny model that resumes without redoing finished methods."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def fake_run(root: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    run = root / "grpo__multistep__0__123"
    run.mkdir(parents=True)
    (run / "args.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_read_result_takes_the_last_test_accuracy_the_tokens_spent_and_the_peak(tmp_path):
    run = fake_run(tmp_path, [
        {"step": 0, "eval/accuracy": 0.1, "perf/gen_tokens": 0},
        {"step": 1, "train/reward": 0.5},
        {"step": 2, "dev/accuracy": 0.9, "perf/gen_tokens": 700},  # dev is not the reported split
        {"step": 3, "eval/accuracy": 0.3, "perf/gen_tokens": 1040, "eval/acc_t1": 0.3, "eval/acc_t2": 0.35},
        {"step": 3, "perf/peak_rss_gb": 2.5},
    ])
    res = bench.read_result(run, bench.Method("GRPO", "grpo", own=("eval/acc_t2", "Acc@t2")))
    assert res["after"] == 0.3 and res["tokens"] == 1040 and res["own"] == 0.35 and res["peak_gb"] == 2.5
    assert res["curve"] == [(0, 0.1), (1040, 0.3)]
    assert bench.read_result(run, bench.METHODS["score"])["after"] == 0.3  # SCoRe: turn 1, the single-turn answer
    with pytest.raises(SystemExit):
        bench.read_result(run, bench.METHODS["spc"])  # no eval/f1 record: an error, not a made-up number


def test_summary_means_and_t_intervals_by_hand():
    rec = lambda m, s, a, t, w: {"method": m, "seed": s, "after": a, "tokens": t, "wall_s": w, "peak_gb": 1.0 + s,
                                 "command": f"cmd {m}", "own": None}
    records = [rec("base", s, 0.1, 0, 10) for s in (0, 1, 2)] + \
              [rec("grpo", 0, 0.2, 900, 60), rec("grpo", 1, 0.4, 1100, 120), rec("grpo", 2, 0.3, 1000, 90)]
    summary = bench.summarise(records)
    g = summary["grpo"]
    # mean 0.3; sample std 0.1; half-width t_{0.975,2} · 0.1 / √3 = 4.303 · 0.057735 = 0.24844
    assert g["mean"] == pytest.approx(0.3) and g["ci"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert g["tokens"] == 1000 and g["wall_s"] == 90 and g["peak_gb"] == 3.0 and g["per_seed"] == [0.2, 0.4, 0.3]
    assert summary["base"]["ci"] == pytest.approx(0.0)
    md = bench.markdown(summary, bench.PRESETS["quick"], "quick", [0, 1, 2], [], "python scripts/benchmark.py --quick")
    row = next(line for line in md.splitlines() if line.startswith("| GRPO |"))
    assert "| 30.0 ± 24.8 | +20.0 | 1,000 | 1.5 | 3.0 |" in row
    assert "Mean over 3 seeds" in md
    one = bench.markdown(bench.summarise(records[:1] + records[3:4]), bench.PRESETS["quick"], "quick", [0], [], "x")
    assert "**One seed:**" in one and "| 20.0 | +10.0 |" in one


def test_every_method_gets_the_same_experiment_flags_and_resumes_from_its_checkpoint(tmp_path):
    p = bench.PRESETS["quick"]
    common = bench.common_flags(p, 3, tmp_path)
    for name, m in bench.METHODS.items():
        if not m.script:
            continue
        cmd = bench.command(name, p, 3, tmp_path)
        assert cmd[1] == f"algos/{m.script}.py" and "--resume" not in cmd
        if name == "ssr_zero":  # its own translation task
            assert "--task" not in cmd and cmd[cmd.index("--token-budget") + 1] == str(p.token_budget)
        else:
            assert cmd[2:2 + len(common)] == common
    run = tmp_path / "grpo__multistep__3__1"
    (run / "checkpoint").mkdir(parents=True)
    (run / "args.json").write_text("{}")
    assert "--resume" not in bench.command("grpo", p, 3, tmp_path)  # a run that never saved starts afresh
    (run / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    assert bench.command("grpo", p, 3, tmp_path)[-2:] == ["--resume", str(run)]
    assert "--resume" not in bench.command("grpo", p, 3, tmp_path, resume=False)


def test_bad_flags_exit_with_one_line_before_any_work(tmp_path):
    for flags in (["--quick", "--full"], ["--methods", "grpo", "nope"], ["--token-budget", "0"], ["--seeds"]):
        r = subprocess.run([sys.executable, "scripts/benchmark.py", *flags, "--out-dir", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "error" in r.stderr, (flags, r.stderr)
        assert not any(tmp_path.iterdir())


def test_quick_on_the_tiny_model_runs_every_row_and_resumes(tmp_path):
    cmd = [sys.executable, "scripts/benchmark.py", "--quick", "--model", "tiny", "--token-budget", "120", "--n-test",
           "4", "--max-new-tokens", "8", "--methods", "base", "sft", "grpo", "--out-dir", str(tmp_path / "runs"),
           "--docs-dir", str(tmp_path / "docs")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "docs" / "results.md").read_text()
    assert (tmp_path / "docs" / "results" / "quick_accuracy_vs_tokens.png").stat().st_size > 1000
    for label in ("| base model (no training) |", "| SFT on reference answers (baseline) |", "| GRPO |"):
        assert label in md
    data = json.loads((tmp_path / "docs" / "results" / "quick.json").read_text())
    grpo = next(x for x in data["runs"] if x["method"] == "grpo")
    assert 120 <= grpo["tokens"] <= 120 + 4 * 8 * 8  # stopped by the budget, at most one step (B·G·8 tokens) over
    assert "--token-budget 120" in grpo["command"] and "--resume" not in grpo["command"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.count("done already") == 3

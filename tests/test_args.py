"""shared/args.py: the shared flags, and bad input failing fast, in one line, before any model, task or
run directory, for every script."""

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from shared.args import LMArgs, StepArgs, check_args, cli, holds, rules_of

ROOT = Path(__file__).resolve().parents[1]
LM_SCRIPTS = ["grpo", "nft", "star", "sft"]


# ---------------------------------------------------------------- the rule language
@pytest.mark.parametrize("value, rule, ok", [
    (1, "> 0", True), (0, "> 0", False), (2, ">= 2", True), (1, ">= 2", False), (-1, "<= 0", True),
    (0.0, "[0, 1]", True), (1.0, "[0, 1]", True), (1.01, "[0, 1]", False), (0.0, "(0, 1]", False),
    (1.0, "[0, 1)", False), (None, "> 0", True), ((0.5, 1.2), "> 0", True), ((0.5, 0.0), "> 0", False),
    (3, ">= 2; a reason", True), (1, ">= 2; a reason", False)])
def test_rules(value, rule, ok):
    assert holds(value, rule) is ok


def test_rules_merge_along_the_mro_and_a_subclass_overrides():
    @dataclass
    class A(StepArgs):
        batch_size: int = 4
        RULES: ClassVar = {"batch_size": "> 0", "lr": "> 0"}

    rules = rules_of(A)
    assert rules["total_steps"] == ">= 1" and rules["n_train"] == ">= 1"  # inherited
    assert rules["lr"] == "> 0" and rules_of(LMArgs)["lr"] == ">= 0"  # replaced in A only


def _error(capsys, fn):
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_check_args_one_line_names_flag_value_and_what_is_allowed(capsys):
    code, err = _error(capsys, lambda: check_args(StepArgs(total_steps=0)))
    assert code == 2 and err == "error: --total-steps 0: must be ≥ 1"
    code, err = _error(capsys, lambda: check_args(LMArgs(task="nosuch")))
    assert code == 2 and err.startswith("error: --task nosuch: must be one of arith, multistep") and "\n" not in err
    code, err = _error(capsys, lambda: check_args(LMArgs(task="arith", level=7)))
    assert err == "error: --level 7: arith has levels 1, 2, 3, 4, 5"
    code, err = _error(capsys, lambda: check_args(LMArgs(load_in_4bit=True)))
    assert "--lora-r" in err and code == 2


def test_per_process_fields_must_divide_by_the_number_of_processes(capsys):
    from algos.grpo import Args

    check_args(Args(batch_size=4), world=2)
    code, err = _error(capsys, lambda: check_args(Args(batch_size=3), world=2))
    assert code == 2 and err == "error: --batch-size 3: must be divisible by the 2 processes"


def test_tyro_errors_fold_into_one_line(capsys, monkeypatch):
    from algos.grpo import Args

    monkeypatch.setattr(sys, "argv", ["grpo.py", "--variant", "nosuch"])
    code, err = _error(capsys, lambda: cli(Args))
    assert code == 2 and "\n" not in err and "--variant" in err and "nosuch" in err and "dapo" in err
    monkeypatch.setattr(sys, "argv", ["grpo.py", "--batch-size", "four"])
    code, err = _error(capsys, lambda: cli(Args))
    assert code == 2 and "\n" not in err and "--batch-size" in err and "four" in err


# ---------------------------------------------------------------- every script, in process
# One bad value of each class per script: (flags, the flag the error must name).
BAD = {
    "grpo": [(["--batch-size", "0"], "--batch-size"), (["--max-new-tokens", "0"], "--max-new-tokens"),
             (["--total-steps", "-1"], "--total-steps"), (["--group-size", "1"], "--group-size"),
             (["--epsilon", "1.5"], "--epsilon"), (["--lr", "-0.1"], "--lr"), (["--task", "nosuch"], "--task"),
             (["--variant", "nosuch"], "--variant")],
    "nft": [(["--batch-size", "0"], "--batch-size"), (["--eval-every", "0"], "--eval-every"),
            (["--epsilon", "0"], "--epsilon"), (["--lr", "-1e-5"], "--lr"), (["--task", "nosuch"], "--task"),
            (["--prompt-weight", "nosuch"], "--prompt-weight")],
    "star": [(["--batch-size", "0"], "--batch-size"), (["--iterations", "0"], "--iterations"),
             (["--min-lr-ratio", "1.5"], "--min-lr-ratio"), (["--lr", "-1"], "--lr"), (["--task", "nosuch"], "--task"),
             (["--mode", "nosuch"], "--mode"), (["--temperatures", "0.5", "0"], "--temperatures")],
    "sft": [(["--batch-size", "0"], "--batch-size"), (["--lr", "0"], "--lr"), (["--token-budget", "-1"], "--token-budget"),
            (["--task", "math500"], "--task"), (["--max-grad-norm", "0"], "--max-grad-norm")],
}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model is an error in these tests: bad flags must stop before it."""
    import shared.run

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(shared.run, "load_model", refuse)


@pytest.mark.parametrize("script, flags, flag", [(s, f, g) for s, cases in BAD.items() for f, g in cases])
def test_bad_flag_exits_2_with_one_line_before_any_work(script, flags, flag, tmp_path, monkeypatch, capsys, no_model):
    module = importlib.import_module(f"algos.{script}")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--model", "tiny", *flags, "--output-dir", str(tmp_path / "runs")])
    code, err = _error(capsys, lambda: module.main(cli(module.Args)))
    assert code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


def _fake_run(tmp_path, algo, fields, checkpoint=True):
    run = tmp_path / f"{algo}__arith__0__1"
    (run / "checkpoint").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"algo": algo, **fields}))
    if checkpoint:
        (run / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    return run


@pytest.mark.parametrize("script", LM_SCRIPTS)
def test_resume_checks_the_directory_before_any_work(script, tmp_path, capsys, no_model):
    module = importlib.import_module(f"algos.{script}")
    other = "grpo" if script != "grpo" else "nft"
    cases = [(tmp_path / "missing", "not a run directory"),
             (_fake_run(tmp_path / "a", other, {"model": "tiny"}), f"a run of {other}, not {script}"),
             (_fake_run(tmp_path / "b", script, {"model": "tiny"}, checkpoint=False), "no checkpoint")]
    for run_dir, why in cases:
        code, err = _error(capsys, lambda: module.main(module.Args(model="tiny", resume=str(run_dir))))
        assert code == 2 and err.startswith(f"error: --resume {run_dir}") and why in err and "\n" not in err, err


def test_an_older_run_without_the_algo_key_is_recognised_by_its_flags(tmp_path, capsys, no_model):
    import algos.grpo as grpo

    run = tmp_path / "nft__arith__0__1"
    (run / "checkpoint").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"model": "tiny", "rft": False, "prompt_weight": "sqrt"}))
    code, err = _error(capsys, lambda: grpo.main(grpo.Args(model="tiny", resume=str(run))))
    assert code == 2 and "not grpo" in err


@pytest.mark.parametrize("script", LM_SCRIPTS)
def test_a_task_too_small_for_n_train_fails_before_the_model(script, tmp_path, capsys, no_model):
    module = importlib.import_module(f"algos.{script}")
    code, err = _error(capsys, lambda: module.main(module.Args(model="tiny", n_train=10**6, output_dir=str(tmp_path))))
    assert code == 2 and err.startswith("error: --n-train 1000000") and "\n" not in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the RL scripts: before any environment
RL_BAD = {
    "spr": [(["--total-steps", "0"], "--total-steps"), (["--gamma", "1.5"], "--gamma"), (["--lr", "-1"], "--lr"),
            (["--env-id", "nosuch"], "--env-id"), (["--v-min", "5", "--v-max", "1"], "--v-max"),
            (["--learning-starts", "5"], "--learning-starts"), (["--per-beta", "2"], "--per-beta")],
    "hilp": [(["--batch-size", "0"], "--batch-size"), (["--expectile", "2"], "--expectile"), (["--lr", "-1"], "--lr"),
             (["--env", "maze2d-nosuch"], "--env"), (["--dataset", "nosuch"], "--dataset"),
             (["--reward-prompt-feature", "x"], "--reward-prompt-feature")],
}


def _no_env(module, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an environment was built before the flags were checked")
    monkeypatch.setattr(module, "make_env", refuse)


@pytest.mark.parametrize("script, flags, flag", [(s, f, g) for s, cases in RL_BAD.items() for f, g in cases])
def test_rl_bad_flag_exits_2_with_one_line_before_any_environment(script, flags, flag, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(f"algos.{script}")
    _no_env(module, monkeypatch)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *flags, "--output-dir", str(tmp_path / "runs")])
    code, err = _error(capsys, lambda: module.main(cli(module.Args)))
    assert code == 2 and err.startswith("error: ") and "\n" not in err and flag in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["spr", "hilp"])
def test_rl_resume_of_another_run_is_refused_before_any_environment(script, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(f"algos.{script}")
    _no_env(module, monkeypatch)
    for run_dir, why in [(tmp_path / "missing", "not a run directory"),
                         (_fake_run(tmp_path, "grpo", {"model": "tiny"}), f"a run of grpo, not {script}")]:
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--resume", str(run_dir)])
        code, err = _error(capsys, lambda: module.main(cli(module.Args)))
        assert code == 2 and err.startswith(f"error: --resume {run_dir}") and why in err and "\n" not in err, err


# ---------------------------------------------------------------- the command line itself
@pytest.mark.slow
@pytest.mark.parametrize("script", LM_SCRIPTS)
def test_command_line_exit_status_and_single_line(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--task", "nosuch",
                          "--output-dir", str(tmp_path / "runs")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "--task nosuch" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", LM_SCRIPTS)
def test_help_documents_every_flag(script):
    """tyro turns each field's docstring into --help; an inherited field keeps its docstring."""
    import dataclasses

    module = importlib.import_module(f"algos.{script}")
    out = subprocess.run([sys.executable, str(ROOT / "algos" / f"{script}.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert out.returncode == 0
    lines = [line.strip("│╭╮╰╯─ ") for line in out.stdout.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("-")] + [len(lines)]
    entries = {lines[i].split()[0].rstrip(","): " ".join(lines[i:j]) for i, j in zip(starts, starts[1:])}
    for f in dataclasses.fields(module.Args):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} missing from --help"
        words = [w for w in entries[flag].split("(default:")[0].split() if not (w.startswith(("-", "{")) or w.isupper())]
        assert len(" ".join(words)) > 8, f"{flag} has no description: {entries[flag]}"

"""The table code of scripts/spr_benchmark.py on a small synthetic log: t intervals, paired differences,
missing runs, resumed (duplicated) log lines and the SPR-loss trend, all checked against hand computations."""

import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("spr_benchmark", ROOT / "scripts" / "spr_benchmark.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RETURNS = {"spr": {1: 1.0, 2: 2.0, 3: 6.0}, "der_aug": {1: -2.0, 2: 0.0, 3: 3.0}, "der": {1: -3.0, 2: -1.0}}


def write_run(out, algo, seed, final, spr_losses=(1.5, 0.8)):
    run = out / f"{algo}__Boxing__{seed}__100"
    run.mkdir(parents=True)
    lines = [{"step": 1000, "train/td_loss": 3.0, "spr/loss": 9.9},  # logged again after a resume: the last counts
             {"step": 1000, "train/td_loss": 3.0, "spr/loss": spr_losses[0]},
             {"step": 2000, "train/td_loss": 2.0, "spr/loss": spr_losses[1]},
             {"step": 1000, "eval/return_mean": -50.0, "eval/return_std": 1.0, "eval/episodes": 2}]
    if final is not None:
        lines.append({"step": 2000, "eval/return_mean": final, "eval/return_std": 1.0, "eval/episodes": 2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps({"algo": algo, "game": "Boxing", "seed": seed, "steps": 2000, "wall_s": 600.0}) + "\n")


def test_t_quantiles_and_interval():
    assert bench.t_quantile(2) == 4.303 and bench.t_quantile(30) == 2.042
    assert bench.t_quantile(31) == pytest.approx(2.040, abs=1e-3) and bench.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)
    mean, hw = bench.t_interval([1.0, 2.0, 6.0])  # sd sqrt(7), n 3
    assert mean == 3.0 and hw == pytest.approx(4.303 * math.sqrt(7) / math.sqrt(3))
    assert math.isnan(bench.t_interval([5.0])[1])


def test_table_on_a_synthetic_log(tmp_path):
    out = tmp_path / "runs"
    for algo, per in RETURNS.items():
        for seed in (1, 2, 3):
            write_run(out, algo, seed, per.get(seed))  # der seed 3 never reached its final evaluation
    s = bench.table(games=["Boxing"], seeds=[1, 2, 3], steps=2000, out_dir=str(out), tag="_t", hardware="test",
                    docs=str(tmp_path / "docs"))
    m = s["methods"]
    assert m["Boxing|spr"]["mean"] == 3.0 and m["Boxing|spr"]["ci"] == pytest.approx(6.5729, abs=1e-4)
    assert m["Boxing|der_aug"]["mean"] == pytest.approx(1 / 3)  # sd sqrt(114 / 18)
    assert m["Boxing|der_aug"]["ci"] == pytest.approx(4.303 * math.sqrt(114 / 18) / math.sqrt(3))
    assert m["Boxing|der"]["per_seed"] == {1: -3.0, 2: -1.0} and m["Boxing|der"]["ci"] == pytest.approx(12.706)
    d = s["paired"]["Boxing|spr-der_aug"]  # per seed 3, 2, 3: mean 8/3, sd sqrt(1/3)
    assert d["diffs"] == [3.0, 2.0, 3.0] and d["mean"] == pytest.approx(8 / 3)
    assert d["ci"] == pytest.approx(4.303 * math.sqrt(1 / 3) / math.sqrt(3))
    d = s["paired"]["Boxing|spr-der"]  # only the seeds both have: 4, 3
    assert d["seeds"] == [1, 2] and d["mean"] == 3.5 and d["ci"] == pytest.approx(12.706 * math.sqrt(0.5) / math.sqrt(2))
    assert s["spr_loss"]["Boxing|1"] == {"first": 1.5, "last": 0.8, "first_step": 1000, "last_step": 2000}
    md = (tmp_path / "docs" / "benchmark_t.md").read_text()
    assert "| Boxing | spr − der_aug | 3 | +3.0, +2.0, +3.0 | 2.7 ± 1.4 | yes |" in md
    assert "| Boxing | spr − der | 2 | +4.0, +3.0 | 3.5 ± 6.4 | no |" in md
    assert "| Boxing | SPR | 3 | 1.0, 2.0, 6.0 | 3.0 ± 6.6 | 0.24 | 0.1 | 35.8 (SPR) |" in md
    assert "0.2 (DER (original))" in md and "Missing runs: Boxing der seed 3." in md
    assert "| Boxing | 1 | 1.500 (1000) | 0.800 (2000) | yes | 1000: 1.500, 2000: 0.800 |" in md
    assert "n = 1" not in md
    assert (tmp_path / "docs" / "benchmark_t.png").exists()
    assert json.loads((tmp_path / "docs" / "benchmark_t.json").read_text())["paired"]["Boxing|spr-der_aug"]["seeds"] == [1, 2, 3]


def test_table_with_one_seed_says_so(tmp_path):
    out = tmp_path / "runs"
    for algo, per in RETURNS.items():
        write_run(out, algo, 1, per[1])
    s = bench.table(games=["Boxing"], seeds=[1], steps=2000, out_dir=str(out), tag="_1", hardware="test",
                    docs=str(tmp_path / "docs"))
    assert math.isnan(s["methods"]["Boxing|spr"]["ci"]) and math.isnan(s["paired"]["Boxing|spr-der"]["ci"])
    md = (tmp_path / "docs" / "benchmark_1.md").read_text()
    assert "n = 1 (one seed per method): no interval" in md
    assert "| Boxing | spr − der | 1 | +4.0 | 4.0 | — |" in md  # one difference: no interval, not "separated"


def test_runs_whose_directories_are_gone_come_from_the_previous_table(tmp_path):
    out = tmp_path / "runs"
    for algo, per in RETURNS.items():
        write_run(out, algo, 1, per[1])
    first = bench.table(games=["Boxing"], seeds=[1], steps=2000, out_dir=str(out), tag="_1", hardware="test",
                        docs=str(tmp_path / "docs"))
    out2 = tmp_path / "runs2"  # seed 1's directories are gone; seed 2 ran later
    for algo, per in RETURNS.items():
        write_run(out2, algo, 2, per[2])
    s = bench.table(games=["Boxing"], seeds=[1, 2], steps=2000, out_dir=str(out2), tag="_12", hardware="test",
                    docs=str(tmp_path / "docs"), previous=str(tmp_path / "docs" / "benchmark_1.json"))
    assert s["methods"]["Boxing|spr"]["per_seed"] == {1: 1.0, 2: 2.0} and s["paired"]["Boxing|spr-der"]["diffs"] == [4.0, 3.0]
    assert first["runs"]["Boxing|spr|1"]["return"] == 1.0
    md = (tmp_path / "docs" / "benchmark_12.md").read_text()
    assert "Boxing spr seed 1, Boxing der_aug seed 1, Boxing der seed 1." in md and "Missing runs: none." in md
    with pytest.raises(SystemExit):  # runs of another length are not mixed in
        bench.table(games=["Boxing"], seeds=[1, 2], steps=3000, out_dir=str(out2), tag="_x", hardware="test",
                    docs=str(tmp_path / "docs"), previous=str(tmp_path / "docs" / "benchmark_1.json"))

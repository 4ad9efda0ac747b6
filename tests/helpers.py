"""Small helpers the test files share: finding the one run a subprocess smoke run wrote, and reading
its metrics (shared.run.read_metrics, re-exported so that tests import both from one place)."""

from pathlib import Path

from shared.run import read_metrics  # noqa: F401  (re-exported)


def only_run(directory) -> Path:
    """The single run directory under `directory` (a smoke run writes exactly one)."""
    runs = [p for p in Path(directory).iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]

"""Means over seeds with t-based 95 % intervals, and paired differences (the benchmarks' tables)."""

from __future__ import annotations

import math

import numpy as np

# two-sided 95 % Student-t quantiles t_{0.975, df}, df = 1..30 (larger df: Cornish-Fisher expansion)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    """t_{0.975, df} for a two-sided 95 % interval."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def t_interval(values) -> tuple[float, float]:
    """Mean and half-width of the t-based 95 % interval of the mean (nan half-width for one value)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), t_quantile(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def paired(a: dict, b: dict) -> dict:
    """Per-seed differences a[seed] - b[seed] over the seeds both have, their mean and 95 % interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, hw = t_interval(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "ci": hw}

"""How the course compares conditions: paired by seed, with a 95% Student-t interval.

Every condition of an experiment runs once per seed, and a seed fixes everything that is random about
a run (initial weights, drop path). Two conditions run with the same seed share that luck, so the
course compares them by their per-seed differences d_1..d_n: the mean difference d̄, its standard
error s / √n (s: the sample standard deviation of the differences), and the interval

    d̄ ± t_{0.975, n-1} · s / √n

which covers the true mean difference in 95% of experiments if the differences are roughly normal.
With n seeds there are n - 1 degrees of freedom, and few of them make the multiplier large: 12.71 at
2 seeds, 4.30 at 3, 2.78 at 5, 2.26 at 10, 1.96 in the limit. A difference is **resolved** when its
interval excludes zero.
"""

from __future__ import annotations

import math
import statistics

__all__ = ["LEVEL", "t_quantile", "t_multiplier", "mean_se", "condition_summary", "paired_gain", "describe_gain"]

LEVEL = 0.95  # the coverage of every interval the course prints


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with `dof` degrees of freedom (through the incomplete beta function)."""
    x = dof / (dof + t * t)
    if x >= 1.0:  # t is 0, or too small for t^2 to register beside dof
        return 0.5
    a, b = dof / 2.0, 0.5
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        tail = math.exp(log_front) * _betacf(a, b, x) / a  # I_x(a, b) = P(|T| > |t|)
    else:
        tail = 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b
    return 1.0 - tail / 2.0 if t >= 0 else tail / 2.0


def t_quantile(p: float, dof: int) -> float:
    """The `p` quantile of Student's t with `dof` degrees of freedom (bisection on its CDF, to 1e-10).

    Raises:
        ValueError: p outside (0, 1) or dof below 1.
    """
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1)")
    if dof < 1:
        raise ValueError(f"dof={dof} must be >= 1 (an interval needs at least two seeds)")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, dof) < p:
        hi *= 2.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if _t_cdf(mid, dof) < p else (lo, mid)
    return (lo + hi) / 2.0


def t_multiplier(n: int, level: float = LEVEL) -> float:
    """The two-sided `level` multiplier of the standard error for a mean of `n` values (n - 1 dof):
    4.30 at n = 3, 2.78 at n = 5.

    Raises:
        ValueError: n below 2 or level outside (0, 1).
    """
    if n < 2:
        raise ValueError(f"n={n}: an interval needs at least two values")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    return t_quantile(0.5 + level / 2.0, n - 1)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation / sqrt(n); None for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def _by_condition_and_seed(rows: list[dict], metric: str) -> dict[tuple, float]:
    """{(condition, seed): the row's `metric`}.

    Raises:
        ValueError: two rows of one condition and seed, or a row without a number for `metric` (named).
    """
    values: dict[tuple, float] = {}
    for row in rows:
        key = (row["condition"], row["seed"])
        if key in values:
            raise ValueError(f"two rows of condition {key[0]!r}, seed {key[1]}: each seed counts once")
        if not isinstance(row.get(metric), int | float):
            raise ValueError(f"condition {key[0]!r}, seed {key[1]}: {metric}={row.get(metric)!r} is not a number")
        values[key] = row[metric]
    return values


def condition_summary(rows: list[dict], metric: str) -> dict[str, dict]:
    """Per condition (in order of first appearance): mean of `metric` over its rows, its standard
    error (None for one row), the half-width of its 95% t-interval (None for one row), n and the
    per-seed values.

    Raises:
        ValueError: as `_by_condition_and_seed` (two rows of one condition and seed, a missing value).
    """
    runs = _by_condition_and_seed(rows, metric)
    summary = {}
    for condition in dict.fromkeys(c for c, _ in runs):
        values = {seed: value for (c, seed), value in runs.items() if c == condition}
        mean, se = mean_se(list(values.values()))
        half = None if se is None else se * t_multiplier(len(values))
        summary[condition] = dict(
            mean=round(mean, 2),
            se=None if se is None else round(se, 2),
            half_width=None if half is None else round(half, 2),
            n=len(values),
            per_seed=values,
        )
    return summary


def paired_gain(rows: list[dict], condition: str, reference: str, metric: str = "test_top1") -> dict:
    """`condition` minus `reference` on `metric`, paired by seed.

    Returns the per-seed gains, their mean, its standard error (None with one seed), n, the
    multiplier t_{0.975, n-1} and the 95% t-interval (None with one seed; computed from the unrounded
    gains, then rounded), whether it excludes zero (`resolved`), and how many standard errors the mean
    is from zero (`z`).

    Raises:
        ValueError: the two conditions were not run with the same seeds (both seed lists named), or
            as `_by_condition_and_seed` (two rows of one condition and seed, a missing value).
    """
    runs = _by_condition_and_seed([r for r in rows if r["condition"] in (condition, reference)], metric)
    seeds = sorted(s for c, s in runs if c == condition)
    other = sorted(s for c, s in runs if c == reference)
    if not seeds or seeds != other:
        raise ValueError(f"pair by seed: {condition!r} has seeds {seeds}, {reference!r} has {other}")
    gains = {seed: runs[condition, seed] - runs[reference, seed] for seed in seeds}
    mean, se = mean_se(list(gains.values()))
    t = None if se is None else t_multiplier(len(gains))
    interval = None if se is None else (mean - t * se, mean + t * se)
    return dict(
        mean=round(mean, 2),
        se=None if se is None else round(se, 2),
        n=len(gains),
        per_seed={seed: round(gain, 2) for seed, gain in gains.items()},
        t=None if t is None else round(t, 2),
        interval=None if interval is None else (round(interval[0], 2), round(interval[1], 2)),
        resolved=interval is not None and (interval[0] > 0 or interval[1] < 0),
        z=None if not se else round(mean / se, 1),
    )


def describe_gain(gain: dict) -> str:
    """`gain` (from `paired_gain`) in words: "+2.67 [+1.23, +4.10] (95% t-interval, t = 4.30 at 3 seeds;
    resolved)", or "+2.67 (one seed: no interval)"."""
    if gain["interval"] is None:
        return f"{gain['mean']:+.2f} (one seed: no interval)"
    lo, hi = gain["interval"]
    verdict = "resolved" if gain["resolved"] else "not resolved"
    how = f"95% t-interval, t = {gain['t']:.2f} at {gain['n']} seeds"
    return f"{gain['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}] ({how}; {verdict})"

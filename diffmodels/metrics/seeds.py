"""Statistics over seeds: a mean with its Student t interval, and t-tests between two groups.

A seed study runs the same params with ``seed`` = 0, 1, 2, ...; each run gives one number per
metric. For a group of n such numbers x_1..x_n (docs/metrics.md#seeds):

    mean  m = sum x_i / n,   s^2 = sum (x_i - m)^2 / (n - 1),
    95% interval  m +- t_{0.975, n-1} * s / sqrt(n)       (none for n = 1: s is undefined)

Two groups a, b are compared by Welch's t-test (unequal variances):

    t = (m_a - m_b) / sqrt(s_a^2/n_a + s_b^2/n_b),
    df = (s_a^2/n_a + s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))   (Welch-Satterthwaite)
    p = 2 * (1 - F_t(|t|; df))                                                           (two-sided)

When both groups ran the same seeds, seed for seed (a study grid: ``-S 'ddpm.mixer=a,b' -S
'seed=0,1,2'``), seed i gave both runs the same data split and order, VAE and noise, so the runs
are *paired* and the test is on the per-seed differences d_i = a_i - b_i (paired t-test):

    t = mean(d) / (s_d / sqrt(n)),   df = n - 1,   p as above

which removes the spread the seeds share (it can be most of it) from the comparison. With d
constant and non-zero, t is infinite and p = 0.

a difference being *significant* when p < ALPHA = 0.05. With 3 seeds a group has 2 degrees of
freedom, so the test only sees large effects (the t quantile is 4.30 against 1.96 for many runs):
"not significant" then means "not shown", not "equal".

The t distribution comes from scipy (a dependency of the package).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05
LEVEL = 0.95
TEST_NAME = "two-sided t-test, p < 0.05 (paired over shared seeds, else Welch's)"


@dataclass(frozen=True)
class Summary:
    """n numbers as mean, sample standard deviation and Student t interval (None for n = 1)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    min: float
    max: float

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2


def t_quantile(q: float, df: float) -> float:
    """The q quantile of Student's t with ``df`` degrees of freedom."""
    return float(stats.t.ppf(q, df))


def two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T ~ Student t with ``df`` degrees of freedom."""
    return float(2.0 * stats.t.sf(abs(t), df))


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean and ``level`` Student t interval of ``values`` (finite numbers, at least one)."""
    xs = [float(v) for v in values]
    if not xs or not all(math.isfinite(v) for v in xs):
        raise ValueError(f"summarize needs finite numbers, got {values!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean, None, None, None, xs[0], xs[0])
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, min(xs), max(xs))


@dataclass(frozen=True)
class TTest:
    t: float
    df: float
    p: float
    kind: str  # "paired" or "Welch"

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def welch(a: Sequence[float], b: Sequence[float]) -> TTest | None:
    """Welch's t-test of mean(a) == mean(b); None when it cannot be run: a group with fewer than 2
    values, or no spread in either group (every run gave the same number: nothing to test against)."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summarize(a), summarize(b)
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return None
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    return TTest(t, df, two_sided_p(t, df), "Welch")


def paired(a: Sequence[float], b: Sequence[float]) -> TTest | None:
    """Paired t-test of mean(a - b) == 0, a[i] and b[i] from the same seed; None with fewer than 2
    pairs or when every difference is 0 (nothing to test)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    d = summarize([x - y for x, y in zip(a, b)])
    if d.std == 0.0:
        if d.mean == 0.0:
            return None
        return TTest(math.copysign(math.inf, d.mean), d.n - 1, 0.0, "paired")
    t = d.mean / (d.std / math.sqrt(d.n))
    return TTest(t, d.n - 1, two_sided_p(t, d.n - 1), "paired")

"""Statistics over seeds (diffmodels.metrics.seeds) and how one seed feeds independent streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmodels.metrics import seeds
from diffmodels.training.state import EpochSampler, derived_seed


@pytest.mark.parametrize("t, df", [(12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.228, 10), (1.960, 10_000)])
def test_two_sided_p_at_the_table_critical_values(t, df):
    """Printed t tables: these t are the two-sided 5% critical values (to the 3 decimals printed)."""
    assert seeds.two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert seeds.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)


@pytest.mark.parametrize("t", [0.0, 0.5, 1.7, 4.0, 30.0])
def test_two_sided_p_closed_forms(t):
    """df = 1 is Cauchy: p = 1 - 2 atan(|t|) / pi; df = 2: p = 1 - |t| / sqrt(2 + t^2)."""
    assert seeds.two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10, abs=1e-14)
    assert seeds.two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-14)


def test_summarize_mean_and_t_interval():
    s = seeds.summarize([1.0, 2.0, 3.0])
    t975 = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))  # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2)) = 0.975
    half = t975 / math.sqrt(3)  # t_{0.975, 2} * s / sqrt(n), s = 1
    assert (s.n, s.mean, s.std, s.min, s.max) == (3, 2.0, 1.0, 1.0, 3.0)
    assert (s.low, s.high) == (pytest.approx(2 - half, rel=1e-12), pytest.approx(2 + half, rel=1e-12))
    one = seeds.summarize([7.5])
    assert (one.n, one.mean, one.std, one.low, one.high, one.half_width) == (1, 7.5, None, None, None, None)
    with pytest.raises(ValueError):
        seeds.summarize([])


def test_interval_covers_the_mean_at_its_level():
    """Coverage of the 95% interval on normal draws of 3: 95% within binomial noise (4000 trials)."""
    rng = np.random.default_rng(0)
    hits = sum(s.low <= 10.0 <= s.high for s in (seeds.summarize(rng.normal(10.0, 2.0, 3)) for _ in range(4000)))
    assert abs(hits / 4000 - 0.95) < 0.012


def test_welch_against_a_float64_hand_computation():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 7.0, 8.0]
    ma, mb = 2.0, 6.0
    va = 1.0 / 3  # s_a^2 / n_a = 1 / 3
    vb = (4 + 1 + 1 + 4) / 3 / 4  # s_b^2 / n_b
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    got = seeds.welch(a, b)
    assert got.t == pytest.approx(t, rel=1e-12) and got.df == pytest.approx(df, rel=1e-12)
    from scipy import stats  # independent reference of the whole test

    ref = stats.ttest_ind(a, b, equal_var=False)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-9) and got.significant == (ref.pvalue < 0.05)
    assert seeds.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).df == pytest.approx(4.0)  # equal spreads: n_a + n_b - 2
    assert seeds.welch([1.0], [2.0, 3.0]) is None  # one seed: no test
    assert seeds.welch([1.0, 1.0], [2.0, 2.0]) is None  # no spread anywhere: nothing to test against


def test_paired_against_scipy_and_its_edge_cases():
    """The paired t-test on per-seed differences equals scipy's ttest_rel; it sees a shift that a
    shared per-seed spread hides from Welch's test."""
    from scipy import stats

    a, b = [0.2575, 0.3240, 0.3010], [0.2619, 0.3264, 0.3042]  # loss per seed, two mixers of one study
    got, ref = seeds.paired(a, b), stats.ttest_rel(a, b)
    assert got.kind == "paired" and got.df == 2
    assert got.t == pytest.approx(ref.statistic, rel=1e-9) and got.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert got.significant and not seeds.welch(a, b).significant
    assert seeds.paired([1.0, 2.0], [0.0, 1.0]).p == 0.0  # constant non-zero difference
    assert seeds.paired([1.0, 2.0], [1.0, 2.0]) is None  # no difference at all: nothing to test
    assert seeds.paired([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        seeds.paired([1.0, 2.0], [1.0])


def test_paired_rejects_at_the_stated_rate_under_the_null():
    """A large shared per-seed effect, no difference between the groups: about 5% significant."""
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(3000):
        shared = rng.normal(0, 10, 3)
        hits += seeds.paired(shared + rng.normal(0, 1, 3), shared + rng.normal(0, 1, 3)).significant
    assert abs(hits / 3000 - 0.05) < 0.013


def test_welch_rejects_at_the_stated_rate_under_the_null():
    """Equal means, unequal spreads, 3 seeds each: about 5% of tests come out significant."""
    rng = np.random.default_rng(1)
    hits = sum(seeds.welch(rng.normal(0, 1, 3), rng.normal(0, 3, 3)).significant for _ in range(3000))
    assert hits / 3000 < 0.065  # Welch is slightly conservative at these sizes


def test_derived_seeds_are_distinct_per_use_and_stable():
    assert derived_seed(0, "data order", 1) == derived_seed(0, "data order", 1)
    drawn = {derived_seed(s, use, e) for s in range(4) for use in ("data order", "diffusion noise") for e in range(4)}
    assert len(drawn) == 32 and all(0 <= v < 2 ** 63 for v in drawn)


def test_seed_s_plus_one_is_not_seed_s_one_epoch_later():
    """The data order of seed 1 must not repeat seed 0's from its second epoch on (it did with
    seed + epoch seeding), or a seed study would train its runs on nearly the same batches."""
    def epochs(seed, n=3):
        sampler = EpochSampler(12, 12, seed)
        return [sampler.next_batch().tolist() for _ in range(n)]

    s0, s1 = epochs(0), epochs(1)
    assert all(s1[e] != s0[e + 1] for e in range(2)) and s0 != s1
    assert epochs(0) == s0  # the same seed, the same order
    assert all(sorted(p) == list(range(12)) for p in s0)
    assert torch.equal(torch.tensor(s0[0]), torch.randperm(12, generator=torch.Generator().manual_seed(
        derived_seed(0, "data order", 0))))

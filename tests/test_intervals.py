"""Bootstrap intervals and the FID floor: coverage, exactness against direct computation, seeding."""

import math

import pytest
import torch

from diffmodels.metrics.fid import frechet_distance
from diffmodels.metrics.intervals import (
    _resample_indices,
    bootstrap_interval,
    fid_floor,
    fid_interval,
    intervals_separate,
    kid_interval,
    polynomial_kernel,
)


def gaussian(n, d, seed, shift=0.0):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + shift


def test_bootstrap_interval_of_the_mean_covers_at_the_stated_rate():
    # 200 independent samples of N(3, 2^2), n = 50: the 95 % interval should hold 3 about 190 times.
    # Binomial(200, 0.95) has sd 3.1; the percentile bootstrap of a mean undercovers slightly at n = 50
    # (about 0.94), so accept 0.95 +- 3.5 sd in counts.
    repeats, hits = 200, 0
    for r in range(repeats):
        x = 3.0 + 2.0 * torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + r))
        out = bootstrap_interval(x, num_resamples=1000, seed=r)
        hits += out["low"] <= 3.0 <= out["high"]
        assert out["low"] < out["value"] < out["high"] and out["value"] == pytest.approx(float(x.mean()))
    sd = math.sqrt(repeats * 0.95 * 0.05)
    assert abs(hits - 0.95 * repeats) <= 3.5 * sd, hits


def test_bootstrap_interval_is_seeded_and_matches_a_loop():
    x = torch.arange(20, dtype=torch.float64).square()
    a, b = bootstrap_interval(x, seed=5), bootstrap_interval(x, seed=5)
    assert a == b and bootstrap_interval(x, seed=6) != a
    idx = _resample_indices(20, 2000, 5)
    means = torch.stack([x[row].mean() for row in idx])  # one resample at a time
    assert a["low"] == pytest.approx(float(torch.quantile(means, 0.025)))
    assert a["high"] == pytest.approx(float(torch.quantile(means, 0.975)))
    median = bootstrap_interval(x, statistic=lambda batch: batch.median(1).values, seed=5)
    assert median["value"] == float(x.median()) and median["low"] <= median["value"] <= median["high"]


def test_bootstrap_interval_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 items"):
        bootstrap_interval([1.0])
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_interval([1.0, 2.0], num_resamples=1)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        bootstrap_interval([1.0, 2.0], level=1.0)


def test_intervals_separate():
    assert intervals_separate({"low": 0, "high": 1}, {"low": 1.5, "high": 2})
    assert intervals_separate({"low": 1.5, "high": 2}, {"low": 0, "high": 1})
    assert not intervals_separate({"low": 0, "high": 1.6}, {"low": 1.5, "high": 2})


@pytest.mark.parametrize("n_fake, dim", [(30, 8), (12, 40)])  # more and fewer items than dimensions
def test_fid_resamples_equal_direct_frechet_distance(n_fake, dim):
    real, fake = gaussian(50, dim, 0), gaussian(n_fake, dim, 1, shift=0.3)
    out = fid_interval(real, fake, num_resamples=40, seed=3)
    direct = torch.tensor([frechet_distance(real, fake[row]) for row in _resample_indices(n_fake, 40, 3)],
                          dtype=torch.float64)
    deviations = direct - direct.mean()
    estimate = frechet_distance(real, fake)
    assert out["fid"] == pytest.approx(estimate, rel=1e-12)
    assert out["low"] == pytest.approx(estimate + float(torch.quantile(deviations, 0.025)), rel=1e-9, abs=1e-9)
    assert out["high"] == pytest.approx(estimate + float(torch.quantile(deviations, 0.975)), rel=1e-9, abs=1e-9)
    assert out["bootstrap_bias"] == pytest.approx(float(direct.mean()) - estimate, rel=1e-9, abs=1e-9)
    assert out["bootstrap_bias"] > 0  # duplicates act like a smaller sample: FID goes up
    assert fid_interval(real, fake, num_resamples=40, seed=3) == out


def test_fid_interval_spread_matches_fresh_draws():
    # 4-d Gaussians, n = 200 generated: the bootstrap's 95 % width should be close to that of
    # FID over 100 fresh generated sets (the quantity the interval stands for)
    real, dim = gaussian(2000, 4, 0), 4
    fresh = torch.tensor([frechet_distance(real, gaussian(200, dim, 10 + s, shift=0.5)) for s in range(100)])
    true_width = float(torch.quantile(fresh, 0.975) - torch.quantile(fresh, 0.025))
    out = fid_interval(real, gaussian(200, dim, 7, shift=0.5), num_resamples=300, seed=0)
    assert 0.6 < (out["high"] - out["low"]) / true_width < 1.6
    both = fid_interval(real, gaussian(200, dim, 7, shift=0.5), num_resamples=100, seed=0, resample_real=True)
    assert both["low"] < both["fid"] < both["high"]


def test_kid_interval_matches_direct_unbiased_mmd():
    real, fake = gaussian(40, 6, 0), gaussian(25, 6, 1, shift=0.4)

    def mmd(x, y):  # the unbiased MMD^2 with a U-statistic over distinct positions, as a plain loop
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        m, n = len(x), len(y)
        return ((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                - 2 * kxy.mean())

    out = kid_interval(real, fake, kid=0.5, num_resamples=60, seed=4)
    direct = torch.stack([mmd(real, fake[row]) for row in _resample_indices(25, 60, 4)])
    deviations = direct - direct.mean()
    assert out["low"] == pytest.approx(0.5 + float(torch.quantile(deviations, 0.025)), rel=1e-9)
    assert out["high"] == pytest.approx(0.5 + float(torch.quantile(deviations, 0.975)), rel=1e-9)
    assert out["bootstrap_bias"] == pytest.approx(float(direct.mean() - mmd(real, fake)), rel=1e-8, abs=1e-12)


def test_fid_floor_is_frechet_distance_of_disjoint_subsets():
    real = gaussian(100, 5, 0)
    out = fid_floor(real, 30, repeats=3, seed=7)
    values = []
    for r in range(3):
        perm = torch.randperm(100, generator=torch.Generator().manual_seed(7 + r))
        assert not set(perm[:30].tolist()) & set(perm[30:60].tolist())
        values.append(frechet_distance(real[perm[:30]], real[perm[30:60]]))
    assert out["fid_floor"] == pytest.approx(sum(values) / 3, rel=1e-12)
    assert out["fid_floor_std"] == pytest.approx(float(torch.tensor(values, dtype=torch.float64).std()), rel=1e-12)
    assert (out["floor_n"], out["floor_repeats"], out["floor_note"]) == (30, 3, "")
    assert fid_floor(real, 30, repeats=3, seed=7) == out
    assert fid_floor(real, 10, repeats=3, seed=7)["fid_floor"] > out["fid_floor"]  # smaller n, higher floor


def test_fid_floor_with_a_small_reference_says_so():
    real = gaussian(50, 3, 0)
    out = fid_floor(real, 40, repeats=2)
    assert out["floor_n"] == 25 and "fewer than 2 x 40" in out["floor_note"] and "n = 25" in out["floor_note"]
    assert fid_floor(real, 40, repeats=1)["fid_floor_std"] == 0.0
    with pytest.raises(ValueError, match="at least 4 reference features"):
        fid_floor(real[:3], 40)


def test_score_features_contract_and_printed_line():
    from diffmodels.metrics.scores import KEYS, format_scores, score_features

    real, fake = gaussian(60, 2048, 0), gaussian(20, 2048, 1, shift=0.05)
    s = score_features(real, fake, kid_subsets=5, seed=0, fid_bootstrap=5, floor_repeats=2)
    assert set(KEYS) <= set(s) and (s["num_real"], s["num_fake"], s["floor_n"]) == (60, 20, 20)
    assert s["fid"] == pytest.approx(frechet_distance(real, fake)) and s["fid_low"] <= s["fid"] <= s["fid_high"]
    assert s["fid_floor"] == fid_floor(real, 20, repeats=2, seed=0)["fid_floor"]
    assert 0 <= s["precision"] <= 1 and s["kid_low"] <= s["kid_mean"] <= s["kid_high"]
    line = format_scores("ddim", s)
    assert line.startswith(f"ddim: FID {s['fid']:.1f} [") and "(n=20 vs 60 real; floor at n=20:" in line and "KID" in line


def test_metric_intervals_and_separated_pairs():
    from diffmodels.metrics.inpainting import metric_intervals, separated_pairs

    def per_image(shift):
        x = gaussian(40, 1, 0)[:, 0]
        return {"psnr_image": 30 + shift + x, "ssim_image": 0.9 + 0 * x, "seam": torch.full((40,), float("inf"))}

    a, b, c = (metric_intervals(per_image(s), 500, 0) for s in (0.0, 0.1, 5.0))
    assert a["seam"] is None and a["psnr_image"]["n"] == 40  # no finite seam values: no interval
    assert separated_pairs({"a": a, "b": b, "c": c})["psnr_image"] == ["a vs c", "b vs c"]

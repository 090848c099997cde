"""FID/KID with the standard InceptionV3: preprocessing, features and metric sanity."""

import numpy as np
import pytest
import torch

from diffmodels.metrics.fid import (
    EXTRACTOR,
    InceptionFeatures,
    _Precomputed,
    fid_kid,
    frechet_distance,
    inception_features,
    resize_bilinear_tf1,
)


def test_tf1_bilinear_resize_hand_computed():
    # 2x2 -> 4x4: source coordinate = dst * 2/4 = 0, 0.5, 1, 1.5 (the last clamped to the border)
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).reshape(1, 1, 2, 2)
    expected = torch.tensor(
        [
            [0.0, 2.0, 4.0, 4.0],
            [4.0, 6.0, 8.0, 8.0],
            [8.0, 10.0, 12.0, 12.0],
            [8.0, 10.0, 12.0, 12.0],
        ]
    )
    assert torch.equal(resize_bilinear_tf1(x, 4)[0, 0], expected)
    # 3 -> 2: coordinates 0 and 1.5 (no half-pixel centres): [a, (b + c) / 2]
    y = torch.tensor([1.0, 3.0, 7.0]).reshape(1, 1, 1, 3).expand(1, 1, 3, 3)
    assert torch.equal(resize_bilinear_tf1(y, 2)[0, 0, 0], torch.tensor([1.0, 5.0]))
    z = torch.rand(2, 3, 5, 5)
    assert torch.equal(resize_bilinear_tf1(z, 5), z)


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures()


def blobs(n, seed, size=32):
    """Smooth random Gaussian blobs: a stand-in for a dataset of real images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.zeros((size, size))
        for _ in range(3):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(3, 8)]
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
        out[i] = (255 * np.clip(img, 0, 1))[:, :, None].astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def features(extractor):
    noise = np.random.default_rng(9).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return {name: inception_features(imgs, extractor) for name, imgs in
            (("a", blobs(8, 0)), ("b", blobs(8, 1)), ("noise", noise))}


def test_preprocessing_and_features_equal_the_torchscript_network(extractor):
    gray = torch.randint(0, 256, (2, 1, 20, 20), dtype=torch.uint8)
    x = extractor.preprocess(gray)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2]), "grayscale repeated"
    ends = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
    ends[..., 150:] = 255
    scaled = extractor.preprocess(ends)  # already 299: no resampling, only (x - 128) / 128
    assert scaled.min() == -1.0 and scaled.max() == 127 / 128
    manual = extractor.net(((resize_bilinear_tf1(gray.float().repeat(1, 3, 1, 1), 299)) - 128) / 128)
    feats = inception_features(gray.permute(0, 2, 3, 1).numpy(), extractor)
    assert feats.shape == (2, 2048)
    assert torch.allclose(feats, manual.double().flatten(1), atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero(features):
    result = fid_kid(features["a"], features["a"], kid_subset_size=4)
    assert abs(result["fid"]) < 1e-2
    assert result["extractor"] == EXTRACTOR


def test_similar_sets_are_far_closer_than_noise(features):
    same_kind = fid_kid(features["a"], features["b"], kid_subset_size=4)
    vs_noise = fid_kid(features["a"], features["noise"], kid_subset_size=4)
    assert same_kind["fid"] > 0
    assert vs_noise["fid"] > 3 * same_kind["fid"]
    assert vs_noise["kid_mean"] > same_kind["kid_mean"]
    assert np.isfinite(same_kind["kid_std"])


def test_kid_is_reproducible_and_small_sets_are_refused(features):
    one = fid_kid(features["a"], features["b"], kid_subset_size=3, seed=5)
    two = fid_kid(features["a"], features["b"], kid_subset_size=3, seed=5)
    assert one["kid_mean"] == two["kid_mean"]
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_kid(features["a"][:1], features["b"])


@pytest.mark.parametrize(("n_real", "n_fake"), [(12, 20), (300, 250)])  # fewer and more samples than dims
def test_frechet_distance_equals_the_sqrtm_closed_form(n_real, n_fake):
    import scipy.linalg

    g = torch.Generator().manual_seed(n_real)
    mix = torch.randn(32, 32, generator=g, dtype=torch.float64)
    real = torch.randn(n_real, 32, generator=g, dtype=torch.float64) @ mix
    fake = torch.randn(n_fake, 32, generator=g, dtype=torch.float64) @ mix.T + 0.3
    mu_r, mu_f = real.mean(0).numpy(), fake.mean(0).numpy()
    s_r, s_f = np.cov(real.numpy(), rowvar=False), np.cov(fake.numpy(), rowvar=False)
    cross = scipy.linalg.sqrtm(s_r @ s_f).real
    expected = ((mu_r - mu_f) ** 2).sum() + np.trace(s_r) + np.trace(s_f) - 2 * np.trace(cross)
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_equals_torchmetrics_fid(features):
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Precomputed())
    metric.update(features["a"].double(), real=True)
    metric.update(features["b"].double(), real=False)
    assert frechet_distance(features["a"], features["b"]) == pytest.approx(float(metric.compute()), rel=1e-5)


def unbiased_mmd2(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with KID's polynomial kernel
    k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), summed pair by pair in float64."""
    x, y = x.double(), y.double()
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def _feature_sets(n_real, n_fake, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64)
    fake = 1.2 * torch.randn(n_fake, dim, generator=g, dtype=torch.float64) + 0.3
    return real, fake


def test_kid_on_whole_sets_is_the_unbiased_mmd_closed_form():
    """Subsets as large as both sets are the whole sets (in some order) every time: the mean is the
    MMD^2 of the two sets and the spread is zero."""
    real, fake = _feature_sets(12, 12)
    result = fid_kid(real, fake, kid_subsets=7, kid_subset_size=12)
    expected = unbiased_mmd2(real, fake)
    assert expected > 0.05
    assert result["kid_mean"] == pytest.approx(expected, rel=1e-10)
    assert result["kid_std"] < 1e-12
    assert fid_kid(real, real, kid_subsets=3)["kid_mean"] == pytest.approx(unbiased_mmd2(real, real), rel=1e-10)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")
def test_kid_over_subsets_is_the_mean_and_spread_of_mmd_on_the_seeded_subsets():
    """Subset k is torch.randperm(n_real)[:size] and torch.randperm(n_fake)[:size] drawn in turn after
    torch.manual_seed(seed) (torchmetrics' order); KID is the mean and the population standard
    deviation of their MMD^2. Also the same as torchmetrics' KernelInceptionDistance on the features
    with its kernel spelled out (degree 3, gamma 1/d, coef 1)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _feature_sets(15, 13, seed=1)
    result = fid_kid(real, fake, kid_subsets=5, kid_subset_size=6, seed=3)
    torch.manual_seed(3)
    scores = []
    for _ in range(5):
        rows_real, rows_fake = torch.randperm(15)[:6], torch.randperm(13)[:6]
        scores.append(unbiased_mmd2(real[rows_real], fake[rows_fake]))
    assert len(set(scores)) == 5, "the subsets differ"
    assert result["kid_mean"] == pytest.approx(np.mean(scores), rel=1e-10)
    assert result["kid_std"] == pytest.approx(np.std(scores), rel=1e-8)

    class Identity(torch.nn.Module):
        def forward(self, feats):
            return feats

    metric = KernelInceptionDistance(feature=Identity(), subsets=5, subset_size=6, degree=3, gamma=None, coef=1.0)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(3)
    mean, std = metric.compute()
    assert (result["kid_mean"], result["kid_std"]) == pytest.approx((float(mean), float(std)), rel=1e-12)
    assert fid_kid(real, fake)["kid_subset_size"] == 13, "default subset size: the smaller set"

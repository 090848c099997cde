"""Improved precision / recall and density / coverage: hand-computed, brute-force and mixture cases."""

import numpy as np
import pytest
import torch

from diffmodels.metrics.manifold import knn_radii, manifold_metrics, per_class_metrics


def brute_force(real: np.ndarray, fake: np.ndarray, k_pr: int, k_dc: int) -> dict:
    """The four definitions as plain float64 loops (Kynkaenniemi et al. 2019; Naeem et al. 2020)."""
    def radius(points, i, k):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    def dist(a, b):
        return float(np.linalg.norm(a - b))

    n, m = len(real), len(fake)
    rx_pr = [radius(real, i, k_pr) for i in range(n)]
    rx_dc = [radius(real, i, k_dc) for i in range(n)]
    ry = [radius(fake, j, k_pr) for j in range(m)]
    precision = sum(any(dist(fake[j], real[i]) <= rx_pr[i] for i in range(n)) for j in range(m)) / m
    recall = sum(any(dist(real[i], fake[j]) <= ry[j] for j in range(m)) for i in range(n)) / n
    density = sum(dist(fake[j], real[i]) <= rx_dc[i] for i in range(n) for j in range(m)) / (k_dc * m)
    coverage = sum(min(dist(real[i], fake[j]) for j in range(m)) <= rx_dc[i] for i in range(n)) / n
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_hand_computed_1d():
    # k = 1.  Real radii: 0 -> 1, 1 -> 1, 3 -> 2, 6 -> 3; generated radii: 9.5 for both.
    # precision: 0.5 in B(0, 1), 10 in no real ball -> 1/2;  recall: B(0.5, 9.5) holds every real point -> 1
    # density: 0.5 in B(0, 1) and B(1, 1), 10 in none -> 2 / (1 * 2) = 1
    # coverage: 0 and 1 have 0.5 within their radius 1; 3 (2.5 > 2) and 6 (4 > 3) do not -> 1/2
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    fake = torch.tensor([[0.5], [10.0]])
    out = manifold_metrics(real, fake, k_pr=1, k_dc=1)
    assert (out["precision"], out["recall"], out["density"], out["coverage"]) == (0.5, 1.0, 1.0, 0.5)
    assert (out["num_real"], out["num_fake"], out["k_pr"], out["k_dc"]) == (4, 2, 1, 1)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_matches_brute_force_loop(chunk):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 2))
    fake = rng.normal(0.7, 1.3, size=(25, 2))
    out = manifold_metrics(torch.from_numpy(real), torch.from_numpy(fake), k_pr=3, k_dc=5, chunk=chunk)
    ref = brute_force(real, fake, 3, 5)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1  # a case where the thresholds matter


def test_knn_radii_against_sorted_distances():
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    d = torch.cdist(x, x)
    expected = d.sort(1).values  # column 0 is the point itself
    radii = knn_radii(x, (1, 3, 5), chunk=4)
    for k in (1, 3, 5):
        assert torch.allclose(radii[k], expected[:, k], atol=1e-10)


def test_identical_sets():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    out = manifold_metrics(x, x.clone())
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0
    # each real ball B(x_i, NND_5) holds x_i itself and its 5 neighbours: density = (k + 1) / k exactly
    assert out["density"] == pytest.approx(6 / 5, abs=1e-12)


def mixture(n, modes, rng, spread=0.1):
    """A 2-d Gaussian mixture: eight well-separated modes (centres 10 apart on a circle of radius 13)."""
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 13.0 * np.stack([np.cos(angles), np.sin(angles)], 1)[modes]
    return torch.from_numpy(centres[rng.integers(0, len(modes), n)] + spread * rng.normal(size=(n, 2)))


def test_half_of_the_modes():
    rng = np.random.default_rng(3)
    real = mixture(2000, list(range(8)), rng)
    fake = mixture(1000, [0, 1, 2, 3], rng)  # the generator covers half the real modes, faithfully
    out = manifold_metrics(real, fake)
    assert out["precision"] > 0.93  # k-NN balls of a finite set miss a few points even of the same law
    assert abs(out["recall"] - 0.5) < 0.05  # the real points of the 4 missing modes are outside
    assert abs(out["coverage"] - 0.5) < 0.05
    assert abs(out["density"] - 1.0) < 0.15  # inside the covered modes the samples are as dense as the data
    same = manifold_metrics(real, mixture(1000, list(range(8)), rng))
    assert same["recall"] > 0.93
    # Naeem et al.'s closed form for Y ~ X: E[coverage] = 1 - prod_{i<k} (N - 1 - i) / (N + M - 1 - i) ~ 0.868
    expected = 1 - np.prod([(2000 - 1 - i) / (3000 - 1 - i) for i in range(5)])
    assert abs(same["coverage"] - expected) < 0.04


def test_disjoint_sets_score_zero():
    rng = np.random.default_rng(4)
    out = manifold_metrics(mixture(100, [0], rng), mixture(100, [1], rng))
    assert out == {**out, "precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_bad_shapes_and_too_few_points():
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        manifold_metrics(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="need more than 5 points"):
        manifold_metrics(torch.randn(5, 3), torch.randn(10, 3))


def test_per_class_metrics_see_a_class_collapse_that_pooled_metrics_miss():
    # Real data: class c is mode c of the mixture (8 classes). The "model" draws class 0's samples
    # from modes 0 and 1 and class 1's from mode 1 only; the other classes are drawn faithfully.
    rng = np.random.default_rng(5)
    labels = torch.arange(8).repeat_interleave(200)
    real = torch.cat([mixture(200, [c], rng) for c in range(8)])
    fakes = {c: mixture(200, [c], rng) for c in range(2, 8)}
    fakes[0] = mixture(200, [0, 1], rng)
    fakes[1] = mixture(200, [1], rng)
    pooled = manifold_metrics(real, torch.cat(list(fakes.values())))
    assert pooled["precision"] > 0.93  # every sample lies on some real mode
    out = per_class_metrics(real, labels, fakes)
    assert set(out) == set(range(8)) and out[3]["num_real"] == 200 and out[3]["num_fake"] == 200
    assert abs(out[0]["precision"] - 0.5) < 0.1  # half of class 0's samples look like class 1
    assert out[0]["recall"] > 0.9 and out[1]["precision"] > 0.9 and out[1]["recall"] > 0.9
    for c in range(2, 8):
        assert out[c]["precision"] > 0.9 and out[c]["recall"] > 0.9
    assert out[5] == manifold_metrics(real[labels == 5], fakes[5])  # the same numbers as one class alone


def test_per_class_metrics_of_too_small_classes_are_none_and_bad_labels_raise():
    real, fake = torch.randn(20, 3), torch.randn(20, 3)
    out = per_class_metrics(real, torch.tensor([0] * 15 + [1] * 5), {0: fake, 1: fake})
    assert out[0]["precision"] is not None
    assert out[1] == {"precision": None, "recall": None, "density": None, "coverage": None, "k_pr": 3, "k_dc": 5,
                      "num_real": 5, "num_fake": 20}
    with pytest.raises(ValueError, match=r"real_labels must be \(20,\)"):
        per_class_metrics(real, torch.zeros(19, dtype=torch.long), {0: fake})

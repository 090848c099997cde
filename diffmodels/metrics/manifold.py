"""Improved precision / recall, density / coverage of generated features (docs/metrics.md#precision-and-recall).

Symbols: real features X = {x_i} (N, D), generated features Y = {y_j} (M, D), ``NND_k(a)`` the
distance from a to its k-th nearest neighbour in its own set (itself excluded), ``B(a, r)``
the closed ball of radius r around a.

Improved precision and recall (Kynkaenniemi et al. 2019, "Improved Precision and Recall Metric
for Assessing Generative Models"; k = 3): a set's manifold is the union of the balls
B(a, NND_k(a)) over its points, and

    precision = 1/M sum_j 1[ y_j in manifold(X) ]       how many samples look real
    recall    = 1/N sum_i 1[ x_i in manifold(Y) ]       how much of the real data is covered

Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"; k = 5), with the real balls only, so an outlier sample cannot inflate them:

    density  = 1/(k M) sum_j sum_i 1[ y_j in B(x_i, NND_k(x_i)) ]   (expected 1 for Y ~ X; unbounded)
    coverage = 1/N sum_i 1[ min_j |x_i - y_j| <= NND_k(x_i) ]      (in [0, 1])

Every number comes from Euclidean distances computed in row chunks, so memory stays at
``chunk`` x max(N, M) float64 values (80 MB for chunk 1024 and 10,000 real features)
instead of the full N x N matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def _sq_norms(x: Tensor) -> Tensor:
    return x.square().sum(1)


def _distances(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """(len(a), len(b)) Euclidean distances in float64: |a|^2 + |b|^2 - 2 a.b, clamped at 0.
    The inputs are centred on a common mean first (by the caller), which keeps the cancellation
    of the expansion small next to the distances themselves."""
    d2 = _sq_norms(a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_(min=0).sqrt_()


def knn_radii(x: Tensor, ks: tuple[int, ...], chunk: int = 1024) -> dict[int, Tensor]:
    """NND_k of every row of x (N, D) float64 for each k in ``ks``: the distance to its k-th
    nearest neighbour among the other rows. -> {k: (N,) float64}."""
    kmax = max(ks)
    if len(x) <= kmax:
        raise ValueError(f"k-NN radii with k = {kmax} need more than {kmax} points, got {len(x)}")
    x_sq = _sq_norms(x)
    out = {k: torch.empty(len(x), dtype=torch.float64) for k in ks}
    for start in range(0, len(x), chunk):
        d = _distances(x[start:start + chunk], x, x_sq)  # (c, N)
        rows = torch.arange(len(d))
        d[rows, rows + start] = 0.0  # the point itself, exactly: it is always the first of the k + 1
        nearest = d.topk(kmax + 1, dim=1, largest=False).values  # (c, kmax + 1), ascending
        for k in ks:
            out[k][start:start + chunk] = nearest[:, k]
    return out


def manifold_metrics(real: Tensor, fake: Tensor, k_pr: int = 3, k_dc: int = 5, chunk: int = 1024) -> dict:
    """Precision, recall (k = ``k_pr``), density and coverage (k = ``k_dc``) of generated
    features ``fake`` (M, D) against real features ``real`` (N, D), any float dtype.

    Three chunked passes over distances: real-real (both radii of X), fake-fake (the recall
    radii of Y), and one real-fake pass from which all four metrics are accumulated.
    Returns floats plus ``k_pr``, ``k_dc``, ``num_real``, ``num_fake``.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}")
    centre = real.double().mean(0)
    x, y = real.double() - centre, fake.double() - centre
    r_x = knn_radii(x, (k_pr, k_dc), chunk)  # {k: (N,)}
    r_y = knn_radii(y, (k_pr,), chunk)[k_pr]  # (M,)
    y_sq = _sq_norms(y)
    in_real = torch.zeros(len(y), dtype=torch.bool)  # y_j inside some B(x_i, NND_kpr(x_i))
    balls_hit = torch.zeros(len(y), dtype=torch.float64)  # number of B(x_i, NND_kdc(x_i)) containing y_j
    covered = torch.empty(len(x), dtype=torch.bool)  # x_i has a sample inside B(x_i, NND_kdc(x_i))
    in_fake = torch.empty(len(x), dtype=torch.bool)  # x_i inside some B(y_j, NND_kpr(y_j))
    for start in range(0, len(x), chunk):
        stop = min(start + chunk, len(x))
        d = _distances(x[start:stop], y, y_sq)  # (c, M)
        rp, rd = r_x[k_pr][start:stop, None], r_x[k_dc][start:stop, None]  # (c, 1)
        in_real |= (d <= rp).any(0)
        balls_hit += (d <= rd).sum(0, dtype=torch.float64)
        covered[start:stop] = d.min(1).values <= rd[:, 0]
        in_fake[start:stop] = (d <= r_y[None, :]).any(1)
    return {
        "precision": float(in_real.double().mean()),
        "recall": float(in_fake.double().mean()),
        "density": float(balls_hit.sum() / (k_dc * len(y))),
        "coverage": float(covered.double().mean()),
        "k_pr": k_pr,
        "k_dc": k_dc,
        "num_real": len(x),
        "num_fake": len(y),
    }


def per_class_metrics(real: Tensor, real_labels: Tensor, fakes: Mapping[int, Tensor], k_pr: int = 3,
                      k_dc: int = 5) -> dict[int, dict]:
    """:func:`manifold_metrics` of each class's generated features ``fakes[c]`` (M_c, D) against
    the real features of that class, ``real[real_labels == c]``: whether the samples of class c
    look like class c (precision, density) and cover it (recall, coverage), which the pooled
    metrics cannot say (a model that draws every class as the same garment can still score
    well pooled). A class with no more than ``max(k_pr, k_dc)`` real or generated points has no
    k-NN radii: its four metrics are None (``num_real`` and ``num_fake`` say why)."""
    if real_labels.shape != (len(real),):
        raise ValueError(f"real_labels must be ({len(real)},), got {tuple(real_labels.shape)}")
    out = {}
    for c, fake in fakes.items():
        own = real[real_labels == c]
        if min(len(own), len(fake)) <= max(k_pr, k_dc):
            out[c] = {**dict.fromkeys(("precision", "recall", "density", "coverage")), "k_pr": k_pr, "k_dc": k_dc,
                      "num_real": len(own), "num_fake": len(fake)}
        else:
            out[c] = manifold_metrics(own, fake, k_pr, k_dc)
    return out

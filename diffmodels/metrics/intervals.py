"""Seeded bootstrap intervals and the FID floor (docs/metrics.md#floors-and-intervals).

- :func:`bootstrap_interval`: percentile interval of a statistic of items (e.g. the mean
  per-image PSNR), all resamples at once as a (B, N) index matrix.
- :func:`fid_interval` / :func:`kid_interval`: the spread of FID / KID over bootstrap resamples
  of the generated features (optionally of the real ones too). A resample repeats about a third
  of its items, which acts like a smaller sample and biases FID upwards, so the interval is the
  2.5 / 97.5 % quantiles of the resampled values' deviations from their own mean, placed around
  the estimate: ``[F + q_lo(F* - mean F*), F + q_hi(F* - mean F*)]``. It answers "how much would
  this number move with another draw of n samples", not "how far is it from FID at n = infinity";
  that bias is what the floor shows.
- :func:`fid_floor`: FID between two disjoint random subsets of the real features, both of the
  generated set's size n: the FID a perfect generator would get at this n.

Everything draws from ``torch.Generator`` seeded by the caller, so every number is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffmodels.metrics.fid import frechet_distance


def _resample_indices(n: int, num_resamples: int, seed: int) -> Tensor:
    """(B, n) int64 indices drawn uniformly with replacement."""
    return torch.randint(0, n, (num_resamples, n), generator=torch.Generator().manual_seed(seed))


def _quantiles(values: Tensor, level: float) -> tuple[float, float]:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values.double(), q).tolist()
    return low, high


def _check(num_resamples: int, level: float) -> None:
    if num_resamples < 2:
        raise ValueError(f"a bootstrap needs at least 2 resamples, got {num_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"the interval level must lie in (0, 1), got {level}")


def bootstrap_interval(values, statistic: Callable[[Tensor], Tensor] | None = None, num_resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> dict:
    """Percentile bootstrap interval of ``statistic`` over the items of ``values`` (N,).

    ``statistic`` maps a (B, N) float64 batch of resamples to (B,) values (default: the mean of
    each row) and is applied to the original items as a (1, N) batch for the estimate.
    Returns ``{"value", "low", "high", "n", "num_resamples", "level"}``.
    """
    _check(num_resamples, level)
    items = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(items) < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 items, got {len(items)}")
    stat = statistic or (lambda batch: batch.mean(1))
    resampled = stat(items[_resample_indices(len(items), num_resamples, seed)])  # (B,)
    low, high = _quantiles(resampled, level)
    return {"value": float(stat(items[None])[0]), "low": low, "high": high, "n": len(items),
            "num_resamples": num_resamples, "level": level}


def intervals_separate(a: dict, b: dict) -> bool:
    """Whether two intervals (dicts with ``low`` and ``high``) do not overlap."""
    return a["high"] < b["low"] or b["high"] < a["low"]


def _centred_interval(estimate: float, resampled: Tensor, level: float) -> tuple[float, float, float]:
    """(low, high, bias): the quantiles of the resampled values' deviations around ``estimate``."""
    centre = float(resampled.mean())
    low, high = _quantiles(resampled - centre, level)
    return estimate + low, estimate + high, centre - estimate


def _fid_of_weights(g_cross: Tensor, sq_fake: Tensor, fake_c: Tensor, real_mean: Tensor, trace_r: float,
                    counts: Tensor) -> float:
    """FID between the real set and a bootstrap resample of the fake set given by ``counts`` (n,)
    (how often each fake item was drawn), from K = A S_r A^T precomputed (see :func:`fid_interval`)."""
    keep = counts > 0
    w, f, k = counts[keep].double(), fake_c[keep], g_cross[keep][:, keep]  # (m,), (m, D), (m, m)
    n = float(counts.sum())
    mean = w @ f / n  # (D,) resample mean (of centred features)
    # centre K on the resample mean: (f_i - mu)^T S_r (f_j - mu)
    k_mu = k @ w / n  # (m,)  f_i^T S_r mu
    k_c = k - k_mu[:, None] - k_mu[None, :] + (w @ k_mu) / n
    root_w = w.sqrt()
    eig = torch.linalg.eigvalsh(root_w[:, None] * k_c * root_w[None, :] / (n - 1))
    # M has rank <= min(m - 1, D, N_r): its zero eigenvalues come out as +-(m eps lambda_max) round-off,
    # which sqrt would turn into ~1e-8 relative noise; below the numerical-rank tolerance they are 0
    eig = torch.where(eig > eig[-1] * len(eig) * torch.finfo(eig.dtype).eps, eig, 0.0)
    cross = eig.sqrt().sum()
    trace_f = (w * (sq_fake[keep] - 2 * f @ mean + mean.square().sum())).sum() / (n - 1)
    return float((real_mean - mean).square().sum() + trace_r + trace_f - 2 * cross)


def fid_interval(real: Tensor, fake: Tensor, num_resamples: int = 50, level: float = 0.95, seed: int = 0,
                 resample_real: bool = False, fid: float | None = None) -> dict:
    """Bootstrap interval of FID(real, fake) over resamples of the generated features (N_f, D),
    and of the real ones too with ``resample_real``.

    Resampling only the fake set, each resample's FID is computed exactly without its D x D
    covariance: with A the fake features and S_r the real covariance, K = A S_r A^T (N_f x N_f)
    is formed once from one (N_f, N_r) product, and for draw counts w the cross term is
    tr((S_r S_f*)^(1/2)) = sum sqrt(eig(W^(1/2) K_c W^(1/2) / (N_f - 1))), K_c being K centred on
    the resample mean, over the ~63 % of items drawn at least once. With ``resample_real`` every
    resample is a full :func:`~diffmodels.metrics.fid.frechet_distance`.

    Returns ``{"fid", "low", "high", "bootstrap_bias", "num_resamples", "level"}``.
    """
    _check(num_resamples, level)
    real, fake = real.double(), fake.double()
    estimate = frechet_distance(real, fake) if fid is None else fid
    fake_idx = _resample_indices(len(fake), num_resamples, seed)
    if resample_real:
        real_idx = _resample_indices(len(real), num_resamples, seed + 1)
        values = [frechet_distance(real[r], fake[f]) for r, f in zip(real_idx, fake_idx, strict=True)]
    else:
        centre = fake.mean(0)
        a_r, fake_c = real - real.mean(0), fake - centre
        half = fake_c @ a_r.T / math.sqrt(len(real) - 1)  # (N_f, N_r)
        g_cross = half @ half.T  # (N_f, N_f) = A S_r A^T
        trace_r = float(a_r.square().sum() / (len(real) - 1))
        real_mean, sq_fake = real.mean(0) - centre, fake_c.square().sum(1)
        counts = torch.zeros(num_resamples, len(fake), dtype=torch.int64).scatter_add_(
            1, fake_idx, torch.ones_like(fake_idx))
        values = [_fid_of_weights(g_cross, sq_fake, fake_c, real_mean, trace_r, c) for c in counts]
    low, high, bias = _centred_interval(estimate, torch.tensor(values, dtype=torch.float64), level)
    return {"fid": estimate, "low": low, "high": high, "bootstrap_bias": bias, "num_resamples": num_resamples,
            "level": level}


def polynomial_kernel(a: Tensor, b: Tensor) -> Tensor:
    """KID's kernel k(a, b) = (a.b / D + 1)^3 (Binkowski et al. 2018), (N, D) x (M, D) -> (N, M)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_interval(real: Tensor, fake: Tensor, kid: float, num_resamples: int = 200, level: float = 0.95,
                 seed: int = 0, max_real: int = 2000) -> dict:
    """Bootstrap interval of KID over resamples of the generated features, around ``kid`` (the
    subset-averaged estimate of :func:`~diffmodels.metrics.fid.fid_kid`).

    Each resample's unbiased MMD^2 is evaluated from the kernel matrices computed once, for all
    resamples as (B, N_f) draw counts w:

        MMD^2* = C_rr + (w^T K_ff w - w . diag K_ff) / (n (n - 1)) - 2 (1^T K_rf w) / (N_r n)

    with the real set a fixed seeded subset of at most ``max_real`` items. The real-real term
    C_rr is the same in every resample, so it cancels in the deviations the interval is built from
    and is never computed. Returns ``{"kid", "low", "high", "bootstrap_bias", "num_resamples", "level"}``.
    """
    _check(num_resamples, level)
    real, fake = real.double(), fake.double()
    if len(real) > max_real:
        real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(seed + 2))[:max_real]]
    n = len(fake)
    k_ff, k_rf = polynomial_kernel(fake, fake), polynomial_kernel(real, fake)  # (n, n), (N_r, n)
    idx = _resample_indices(n, num_resamples, seed)
    w = torch.zeros(num_resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    ff = ((w @ k_ff) * w).sum(1) - w @ k_ff.diagonal()
    rf = w @ k_rf.sum(0)
    partial = ff / (n * (n - 1)) - 2 * rf / (len(real) * n)  # (B,) MMD^2 minus the constant C_rr
    low, high, bias = _centred_interval(kid, partial, level)
    ones = torch.ones(n, dtype=torch.float64)
    unresampled = float(((ones @ k_ff) @ ones - k_ff.diagonal().sum()) / (n * (n - 1)) - 2 * k_rf.sum() / (len(real) * n))
    return {"kid": kid, "low": low, "high": high, "bootstrap_bias": float(partial.mean()) - unresampled,
            "num_resamples": num_resamples, "level": level}


def fid_floor(real: Tensor, n: int, repeats: int = 3, seed: int = 0) -> dict:
    """FID between two disjoint random subsets of size n of the real features (N_r, D), over
    ``repeats`` seeded draws (draw r permutes with seed ``seed + r``, takes rows [0, n) and [n, 2n)).

    If N_r < 2n, the largest disjoint halves (n = N_r // 2) are used and ``floor_note`` says so.
    Returns ``{"fid_floor", "fid_floor_std", "floor_n", "floor_repeats", "floor_note"}``
    (std with ddof 1; 0 for a single repeat).
    """
    if repeats < 1:
        raise ValueError(f"the FID floor needs at least 1 repeat, got {repeats}")
    used, note = n, ""
    if len(real) < 2 * n:
        used = len(real) // 2
        note = (f"the reference has {len(real)} features, fewer than 2 x {n}: floor computed at n = {used} "
                f"(disjoint halves), not at the generated set's n = {n}")
    if used < 2:
        raise ValueError(f"the FID floor needs at least 4 reference features, got {len(real)}")
    values = []
    for r in range(repeats):
        perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed + r))
        values.append(frechet_distance(real[perm[:used]], real[perm[used:2 * used]]))
    v = torch.tensor(values, dtype=torch.float64)
    return {"fid_floor": float(v.mean()), "fid_floor_std": float(v.std()) if repeats > 1 else 0.0,
            "floor_n": used, "floor_repeats": repeats, "floor_note": note}

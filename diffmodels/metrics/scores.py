"""The one result dict of every FID/KID the pipeline writes (metrics.json, MLflow, the printed line).

Keys (docs/metrics.md#floors-and-intervals), always all present:

    fid, fid_low, fid_high          FID and its bootstrap 95 % interval (generated features resampled)
    fid_floor, fid_floor_std        FID of two disjoint real subsets of n = num_fake (mean, std over draws)
    kid_mean, kid_std               KID over random subsets (torchmetrics), and its std over them
    kid_low, kid_high               bootstrap 95 % interval of KID
    num_real, num_fake, extractor   the two set sizes and the feature network
    precision, recall               improved P/R, k = 3   (None when a set has too few points)
    density, coverage               Naeem et al., k = 5   (None likewise)

plus ``kid_subset_size``, ``floor_n`` (the n the floor was computed at) and ``floor_note``
(empty, or why ``floor_n`` differs from ``num_fake``).
"""

from __future__ import annotations

from torch import Tensor

from diffmodels.metrics.fid import fid_kid
from diffmodels.metrics.intervals import fid_floor, fid_interval, kid_interval
from diffmodels.metrics.manifold import manifold_metrics

KEYS = ("fid", "fid_low", "fid_high", "fid_floor", "fid_floor_std", "kid_mean", "kid_std", "kid_low", "kid_high",
        "num_real", "num_fake", "extractor", "precision", "recall", "density", "coverage")
K_PR, K_DC = 3, 5


def score_features(real: Tensor, fake: Tensor, *, kid_subsets: int, kid_subset_size: int | None = None, seed: int = 0,
                   fid_bootstrap: int = 50, floor_repeats: int = 3, floor: dict | None = None,
                   manifold: bool = True) -> dict:
    """FID / KID with intervals and floor, and (``manifold``) precision / recall / density /
    coverage, of generated features ``fake`` (N_f, D) against the reference ``real`` (N_r, D).

    ``floor`` is a :func:`~diffmodels.metrics.intervals.fid_floor` result to reuse (one per n).
    """
    base = fid_kid(real, fake, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
    fid = fid_interval(real, fake, num_resamples=fid_bootstrap, seed=seed, fid=base["fid"])
    kid = kid_interval(real, fake, base["kid_mean"], num_resamples=max(fid_bootstrap, 100), seed=seed)
    floor = floor or fid_floor(real, len(fake), repeats=floor_repeats, seed=seed)
    pr = dict.fromkeys(("precision", "recall", "density", "coverage"))
    if manifold and min(len(real), len(fake)) > K_DC:
        pr.update({k: v for k, v in manifold_metrics(real, fake, K_PR, K_DC).items() if k in pr})
    out = {"fid": base["fid"], "fid_low": fid["low"], "fid_high": fid["high"], "fid_floor": floor["fid_floor"],
           "fid_floor_std": floor["fid_floor_std"], "kid_mean": base["kid_mean"], "kid_std": base["kid_std"],
           "kid_low": kid["low"], "kid_high": kid["high"], "num_real": base["num_real"], "num_fake": base["num_fake"],
           "extractor": base["extractor"], **pr, "kid_subset_size": base["kid_subset_size"],
           "floor_n": floor["floor_n"], "floor_note": floor["floor_note"]}
    assert set(KEYS) <= set(out)
    return out


def rounded(scores: dict, digits: int = 5) -> dict:
    """The dict with floats rounded to ``digits`` significant digits (for metrics.json)."""
    return {k: float(f"{v:.{digits}g}") if isinstance(v, float) else v for k, v in scores.items()}


def format_scores(name: str, s: dict) -> str:
    """One line, e.g. ``ddim: FID 41.2 [39.8, 43.0] (n=1000 vs 10000 real; floor at n=1000: 12.3 +- 0.4)
    KID 0.0123 +- 0.0008 [0.0110, 0.0137]; P 0.71 R 0.52 D 0.88 C 0.80``."""
    line = (f"{name}: FID {s['fid']:.1f} [{s['fid_low']:.1f}, {s['fid_high']:.1f}] (n={s['num_fake']} vs "
            f"{s['num_real']} real; floor at n={s['floor_n']}: {s['fid_floor']:.1f} +- {s['fid_floor_std']:.1f}) "
            f"KID {s['kid_mean']:.4f} +- {s['kid_std']:.4f} [{s['kid_low']:.4f}, {s['kid_high']:.4f}]")
    if s.get("precision") is not None:
        line += f"; P {s['precision']:.2f} R {s['recall']:.2f} D {s['density']:.2f} C {s['coverage']:.2f}"
    return line

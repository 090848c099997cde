"""Stage cache_latents: frozen VAE + data/prepared -> data/latents (posterior moments, scale factor).

    python3 -m stages.cache_latents --prepared data/prepared --vae data/models/vae.safetensors \\
        --out data/latents --reports reports/cache_latents

Layout and the exact scale-factor definition: :mod:`diffmodels.data.latent_cache`.
"""

from __future__ import annotations

import time

import torch

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import CheckpointError
from diffmodels.core.io import atomic_dir, write_json
from diffmodels.core.progress import progress
from diffmodels.data import latent_cache
from diffmodels.data.datasets import SPLITS, load_split, sha256_file
from diffmodels.models.vae import load_vae
from stages._cli import base_parser, stage_main

GROUPS = ("latents",)

parser = base_parser(__doc__.splitlines()[0], "prepared", "vae", "out", "reports")
parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")


def run(args) -> None:
    params = load_params(args.params)
    bs = params.latents.batch_size
    started = time.perf_counter()
    device = select_device(args.device)
    vae, vae_meta = load_vae(args.vae, device)  # eval mode
    vae.requires_grad_(False)
    if vae.config.latent_channels != params.latents.channels:
        raise CheckpointError(
            f"{args.vae}: VAE has {vae.config.latent_channels} latent channels but latents.channels is "
            f"{params.latents.channels}; run `dvc repro train_vae`"
        )

    with tracking.stage_run("cache_latents", params, GROUPS):
        moments, images = {}, {}
        for split in SPLITS:
            data = load_split(args.prepared, split)
            def bar(batches, split=split):  # a bar on a terminal, a line every 5 % in logs
                return progress(batches, desc=f"encode {split}", unit="batch")

            moments[split] = (*latent_cache.encode_images(vae, data.images, bs, device, bar), data.labels)
            images[split] = data.images

        # Scale factor and stats from the train means (diffmodels.data.latent_cache.SCALE_FACTOR_DEFINITION)
        scale = latent_cache.scale_factor(moments["train"][0])
        stats = latent_cache.channel_stats(moments["train"][0])
        mean_posterior_std = float(torch.exp(0.5 * moments["train"][1]).mean())
        # Reconstruction through the cache: decode the cached val means (equals train_vae's val PSNR)
        recon = latent_cache.metrics_from_latents(vae, moments["val"][0], images["val"], bs, device)

        manifest = {
            "format": latent_cache.FORMAT,
            "scale_factor": scale,
            "scale_factor_definition": latent_cache.SCALE_FACTOR_DEFINITION,
            "usage": "diffusion sees z = mean * scale_factor (or a posterior sample times it); decode z / scale_factor",
            "layout": "mean, logvar (N, C, H/8, W/8) float32; labels (N,) int16; posterior q(z|x) = N(mean, exp(logvar))",
            "latent_shape": list(moments["train"][0].shape[1:]),
            "channel_mean": stats["mean"],
            "channel_std": stats["std"],
            "splits": {s: {"file": f"{s}.safetensors", "count": len(m[0])} for s, m in moments.items()},
            "vae": {"file": str(args.vae), "sha256": sha256_file(args.vae), "config": vae.config.to_dict(),
                    "step": vae_meta.get("step")},
        }
        with atomic_dir(args.out) as tmp:
            for split, (mean, logvar, labels) in moments.items():
                info = {"split": split, "scale_factor": scale}
                latent_cache.write_split(tmp / f"{split}.safetensors", mean, logvar, labels, info)
            write_json(tmp / "manifest.json", manifest)

        metrics = {
            "scale_factor": round(scale, 6),
            "channel_mean": {f"c{i}": round(v, 5) for i, v in enumerate(stats["mean"])},
            "channel_std": {f"c{i}": round(v, 5) for i, v in enumerate(stats["std"])},
            "mean_posterior_std": round(mean_posterior_std, 6),
            "val_psnr": round(recon["psnr"], 4),
            "val_ssim": round(recon["ssim"], 5),
            **{f"num_{s}": len(m[0]) for s, m in moments.items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_json(args.reports / "metrics.json", metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifact(args.reports / "metrics.json")
        tracking.log_artifact(args.out / "manifest.json")

    print(
        f"cache_latents: {', '.join(f'{len(m[0])} {s}' for s, m in moments.items())} latents "
        f"{tuple(moments['train'][0].shape[1:])}, scale factor {scale:.4f}, "
        f"val PSNR through cache {recon['psnr']:.2f} dB ({metrics['seconds']:.0f}s)"
    )


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

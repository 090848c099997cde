"""Stage eval_inpaint: every inpainting method x every mask set, scored, with FID/KID of the fills.

    python3 -m stages.eval_inpaint --ddpm data/models/ddpm.safetensors --vae data/models/vae.safetensors \\
        --prepared data/prepared --masks data/masks --fid-reference data/fid/test_features.safetensors \\
        --reports reports/eval_inpaint

For each method of ``inpaint.methods`` (:mod:`diffmodels.diffusion.inpaint`) and each mask set of
``data.mask_sets`` it inpaints the first ``inpaint.num_images`` test images and scores them
(:mod:`diffmodels.metrics.inpainting`): preserved-region PSNR / SSIM / MAE against the image and
against its VAE reconstruction, the seam score, and FID / KID of each method's fills over all mask
sets. The VAE's own leakage (decoder and encoder) does not depend on the denoiser and is measured
by stage eval_leakage.

Outputs in ``reports/eval_inpaint/``: ``metrics.json`` (``<method>/<mask set>/<metric>`` means;
``intervals/<mask set>/<method>/<metric>`` bootstrap 95 % intervals of PSNR / SSIM / seam over
images and ``separated/<mask set>/<metric>`` the method pairs whose intervals do not overlap;
``scores/<method>``: FID / KID of the fills with n, floor and intervals, the key contract of
:mod:`diffmodels.metrics.scores`) and ``panels/<method>.png`` (original | mask | inpainted |
process). MLflow: one child run per method under the stage run.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import InpaintParams, load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json
from diffmodels.data.datasets import load_split
from diffmodels.data.images import to_model_range, to_uint8
from diffmodels.data.masks import load_mask_set
from diffmodels.diffusion import inpaint
from diffmodels.diffusion.denoiser import load_denoiser
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.metrics.fid import EXTRACTOR, InceptionFeatures, inception_features
from diffmodels.metrics.inpainting import evaluate_method, metric_intervals, reconstructions, separated_pairs
from diffmodels.metrics.intervals import fid_floor
from diffmodels.metrics.scores import format_scores, rounded, score_features
from diffmodels.models.unet import UNet
from diffmodels.models.vae import VAE, load_vae
from diffmodels.reporting.sampling_figures import inpaint_panel
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "inpaint", "eval", "data")
PROCESS_POINTS = 4  # decoded x0 estimates in the panels' process columns

parser = base_parser(__doc__.splitlines()[0], "ddpm", "vae", "prepared", "masks", "fid-reference", "reports")


def check(p: InpaintParams, num_steps: int) -> None:
    """The inpaint params that depend on the trained denoiser's number of steps T."""
    if "sdedit" in p.methods and p.sdedit_t0 > num_steps:
        raise DataError(f"inpaint.sdedit_t0 {p.sdedit_t0} is beyond the denoiser's {num_steps} steps (ddpm.num_steps)")
    if p.sampler == "ddim" and p.ddim_steps > num_steps:
        raise DataError(f"inpaint.ddim_steps {p.ddim_steps} exceeds the denoiser's {num_steps} steps (ddpm.num_steps)")


def inpaint_settings(p: InpaintParams, model: UNet, vae: VAE, schedule: NoiseSchedule, scale: float,
                     prediction: str) -> dict:
    """The keyword arguments of :func:`~diffmodels.diffusion.inpaint.inpaint_images` for these params
    and models: the VAE's posterior mean as the encoder, the denoiser unconditional."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x)[0]

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(z, t, None)  # unconditional (the null label when class-conditional)

    sampler = inpaint.Sampler(kind=p.sampler, ddim_steps=p.ddim_steps, prediction=prediction)
    return dict(encode=encode, decode=vae.decode, denoise_fn=denoise, schedule=schedule, scale_factor=scale,
                mask_policy=p.mask_policy, sampler=sampler, jump_length=p.repaint_jump, resample=p.repaint_resample,
                sdedit_t0=p.sdedit_t0, paste=p.paste_back)


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.inpaint, params.seed
    started = time.perf_counter()
    device = select_device("auto")
    model, schedule, meta = load_denoiser(args.ddpm, device)
    vae, _ = load_vae(args.vae, device)
    scale, T = float(meta["scale_factor"]), schedule.num_steps
    check(p, T)
    test = load_split(args.prepared, "test")
    masks = {name: load_mask_set(args.masks, name, test.images.shape[1]) for name in params.data.mask_sets}
    n = min(p.num_images, len(test.images), *(len(m) for m in masks.values()))
    images = to_model_range(torch.from_numpy(np.array(test.images[:n]))).to(device)  # (n, C, H, W) in [-1, 1]
    first = np.array(test.images[0])  # (H, W, C) uint8: the panels' original column
    real = load_checkpoint(args.fid_reference).tensors["features"]
    torch.set_grad_enabled(False)
    settings = inpaint_settings(p, model, vae, schedule, scale, meta["prediction"])
    recon = reconstructions(images, settings["encode"], vae.decode, p.batch_size)
    out = args.reports
    metrics: dict = {"num_images": n, "fid_extractor": EXTRACTOR, "mask_policy": p.mask_policy,
                     "sampler": f"{p.sampler}-{p.ddim_steps if p.sampler == 'ddim' else T}"}
    extractor = InceptionFeatures()
    e, floors, intervals = params.eval, {}, {name: {} for name in masks}
    metrics["scores"] = {}

    with tracking.stage_run("eval_inpaint", params, GROUPS):
        for method in p.methods:  # every method x every mask set: fidelity, seam, fills for FID/KID
            method_started, fills, examples = time.perf_counter(), [], {}
            with tracking.child_run(method, tags={"stage": f"eval_inpaint/{method}", "method": method}):
                for name, result in evaluate_method(method, images, recon, masks, batch_size=p.batch_size, seed=seed,
                                                    process_points=PROCESS_POINTS, **settings):
                    metrics.update({f"{method}/{name}/{k}": v for k, v in result.scores.items()})
                    intervals[name][method] = metric_intervals(result.per_image, e.bootstrap, seed)
                    tracking.log_metrics({name: result.scores})
                    fills.append(to_uint8(result.output).cpu().numpy())
                    if len(examples) < p.panel_images:
                        examples[name] = [fills[-1][0], *(to_uint8(vae.decode(z / scale))[0].cpu().numpy()
                                                          for z in result.process)]
                feats = inception_features(np.concatenate(fills), extractor, e.fid_batch_size, device)
                if len(feats) not in floors:
                    floors[len(feats)] = fid_floor(real, len(feats), repeats=e.floor_repeats, seed=seed)
                fid = rounded(score_features(real, feats, kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size,
                                             seed=seed, fid_bootstrap=e.fid_bootstrap, floor=floors[len(feats)]))
                metrics["scores"][method] = fid
                metrics[f"seconds/{method}"] = round(time.perf_counter() - method_started, 1)
                tracking.log_metrics({"scores": fid})
                tracking.set_tags({"fid_extractor": EXTRACTOR})
                panel = inpaint_panel(out / "panels" / f"{method}.png", first, {k: m[0] for k, m in masks.items()},
                                      examples, title=f"{method} ({metrics['sampler']}, mask policy {p.mask_policy})")
                if params.tracking.log_images:
                    tracking.log_artifact(str(panel), artifact_path="panels")

        metrics["intervals"] = intervals
        metrics["separated"] = {name: separated_pairs(by_method) for name, by_method in intervals.items()}
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / "metrics.json", metrics)
        tracking.log_metrics(metrics)
        tracking.log_artifact(str(out / "metrics.json"))

    print(f"eval_inpaint: {len(p.methods)} methods x {len(masks)} mask sets x {n} images ({metrics['seconds']:.0f}s)")
    for method in p.methods:
        print("eval_inpaint: " + format_scores(method, metrics["scores"][method]))
    pairs = sum(len(v) for by_metric in metrics["separated"].values() for v in by_metric.values())
    print(f"eval_inpaint: {pairs} (mask set, metric, method pair) intervals separate (metrics.json: separated)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

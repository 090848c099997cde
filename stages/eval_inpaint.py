"""Stage eval_inpaint: every inpainting method x every mask set, scored, with FID/KID of the fills.

    python -m stages.eval_inpaint --ddpm data/models/ddpm.safetensors --vae data/models/vae.safetensors \\
        --prepared data/prepared --masks data/masks --fid-reference data/fid/test_features.safetensors \\
        --reports reports/eval_inpaint

For each method of ``inpaint.methods`` (SPEC 5.5) and each mask set (SPEC 6, "Mask sets") it
inpaints the first ``inpaint.num_images`` test images and scores (SPEC 6.3-6.5): preserved-region
PSNR / SSIM / MAE against the image and against its VAE reconstruction, the seam score, and FID /
KID of each method's fills over all mask sets. The VAE's own leakage (SPEC 6.1, 6.2) does not
depend on the denoiser and is measured by stage eval_leakage.

Outputs in ``reports/eval_inpaint/``: ``metrics.json`` (``<method>/<mask set>/<metric>``,
``fid/<method>``, ``kid/<method>``) and ``panels/<method>.png`` (original | mask | inpainted |
process). MLflow: one child run per method under the stage run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from tqdm import tqdm

from diffmodels.core import tracking
from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json
from diffmodels.data.datasets import load_split
from diffmodels.data.images import to_model_range, to_uint8
from diffmodels.data.masks import load_mask_set
from diffmodels.diffusion import inpaint
from diffmodels.diffusion.denoiser import load_denoiser
from diffmodels.metrics.fid import (
    EXTRACTOR,
    InceptionFeatures,
    fid_kid,
    inception_features,
)
from diffmodels.metrics.fidelity import preserved_fidelity
from diffmodels.metrics.seam import seam_score
from diffmodels.models.vae import load_vae
from diffmodels.reporting.figures import labelled_grid
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "inpaint", "eval", "data")
PROCESS_POINTS = 4  # decoded x0 estimates in the panels' process columns

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--ddpm", type=Path, default=Path("data/models/ddpm.safetensors"))
parser.add_argument("--vae", type=Path, default=Path("data/models/vae.safetensors"))
parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
parser.add_argument("--masks", type=Path, default=Path("data/masks"))
parser.add_argument("--fid-reference", type=Path, default=Path("data/fid/test_features.safetensors"))
parser.add_argument("--reports", type=Path, default=Path("reports/eval_inpaint"))


def mask_overlay(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with the hole tinted mid-grey, for the panels' mask column."""
    out = image.astype(np.float32)
    out[hole] = 0.35 * out[hole] + 0.65 * 128.0
    return out.round().astype(np.uint8)


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.inpaint, params.seed
    started = time.perf_counter()
    device = select_device("auto")
    model, schedule, meta = load_denoiser(args.ddpm, device)
    vae, _ = load_vae(args.vae, device)
    scale, T = float(meta["scale_factor"]), schedule.num_steps
    if "sdedit" in p.methods and p.sdedit_t0 > T:
        raise DataError(f"inpaint.sdedit_t0 {p.sdedit_t0} is beyond the denoiser's {T} steps (ddpm.num_steps)")
    if p.sampler == "ddim" and p.ddim_steps > T:
        raise DataError(f"inpaint.ddim_steps {p.ddim_steps} exceeds the denoiser's {T} steps (ddpm.num_steps)")
    test = load_split(args.prepared, "test")
    size = test.images.shape[1]
    masks = {name: load_mask_set(args.masks, name, size) for name in params.data.mask_sets}
    n = min(p.num_images, len(test.images), *(len(m) for m in masks.values()))
    images = to_model_range(torch.from_numpy(np.array(test.images[:n]))).to(device)  # (n, C, H, W) in [-1, 1]
    first = np.array(test.images[0])  # (H, W, C) uint8: the panels' original column
    real = load_checkpoint(args.fid_reference).tensors["features"]
    sampler = inpaint.Sampler(kind=p.sampler, ddim_steps=p.ddim_steps, prediction=meta["prediction"])
    torch.set_grad_enabled(False)

    def encode(x: torch.Tensor) -> torch.Tensor:
        return vae.encode(x)[0]

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(z, t, None)  # unconditional (the null label when class-conditional)

    recon = torch.cat([inpaint.reconstruct(images[i:i + p.batch_size], encode, vae.decode)
                       for i in range(0, n, p.batch_size)])
    out = args.reports
    metrics: dict = {"num_images": n, "fid_extractor": EXTRACTOR, "mask_policy": p.mask_policy,
                     "sampler": f"{p.sampler}-{p.ddim_steps if p.sampler == 'ddim' else T}"}
    extractor = InceptionFeatures()

    with tracking.stage_run("eval_inpaint", params, GROUPS) as stage:
        # every method x every mask set: fidelity, seam, fills for FID/KID
        for method in p.methods:
            method_started, fills, panel_rows = time.perf_counter(), [], []
            tags = {**tracking.run_tags("eval_inpaint", tracking.project_root()), "stage": f"eval_inpaint/{method}",
                    "method": method}
            with mlflow.start_run(experiment_id=stage.info.experiment_id, run_name=method, nested=True, tags=tags):
                for set_index, (name, set_masks) in enumerate(tqdm(masks.items(), desc=method, unit="set", disable=None)):
                    hole_all = torch.from_numpy(set_masks[:n])
                    outputs, process = [], []
                    for i in range(0, n, p.batch_size):
                        x, hole = images[i:i + p.batch_size], hole_all[i:i + p.batch_size]
                        snaps: list = []
                        outputs.append(inpaint.inpaint_images(
                            method, x, hole, encode=encode, decode=vae.decode, denoise_fn=denoise, schedule=schedule,
                            scale_factor=scale, mask_policy=p.mask_policy, sampler=sampler, jump_length=p.repaint_jump,
                            resample=p.repaint_resample, sdedit_t0=p.sdedit_t0, paste=p.paste_back,
                            generator=torch.Generator().manual_seed(seed + 7919 * set_index + i),
                            callback=snaps.append if i == 0 else None))
                        if i == 0:
                            keep = np.linspace(0, len(snaps) - 1, PROCESS_POINTS).round().astype(int)
                            process = [to_uint8(vae.decode(snaps[k].x0[:1] / scale))[0].cpu().numpy() for k in keep]
                    output = torch.cat(outputs)
                    scores = preserved_fidelity(output, images, recon, hole_all)
                    scores["seam"] = seam_score(output, images, hole_all)
                    for key, values in scores.items():
                        finite = values[torch.isfinite(values)]
                        metrics[f"{method}/{name}/{key}"] = round(float(finite.mean()), 5) if len(finite) else None
                    mlflow.log_metrics({f"{name}/{k}": v for k, v in
                                        ((k, metrics[f"{method}/{name}/{k}"]) for k in scores) if v is not None})
                    pixels = to_uint8(output).cpu().numpy()
                    fills.append(pixels)
                    if len(panel_rows) < p.panel_images:
                        panel_rows.append([first, mask_overlay(first, set_masks[0]), pixels[0], *process])
                fid = fid_kid(real, inception_features(np.concatenate(fills), extractor, params.eval.fid_batch_size, device),
                              kid_subsets=params.eval.kid_subsets, seed=seed)
                metrics.update({f"fid/{method}": round(fid["fid"], 3), f"kid/{method}": round(fid["kid_mean"], 5),
                                f"seconds/{method}": round(time.perf_counter() - method_started, 1)})
                mlflow.log_metrics({"fid": fid["fid"], "kid": fid["kid_mean"]})
                mlflow.set_tag("fid_extractor", EXTRACTOR)
                panel = out / "panels" / f"{method}.png"
                labelled_grid(panel_rows, panel, row_labels=list(masks)[:len(panel_rows)],
                              col_labels=["original", "mask", "inpainted", *(f"x0 @{j + 1}/{PROCESS_POINTS}" for j in range(PROCESS_POINTS))],
                              title=f"{method} ({metrics['sampler']}, mask policy {p.mask_policy})")
                if params.tracking.log_images:
                    mlflow.log_artifact(str(panel), artifact_path="panels")

        metrics["seconds"] = round(time.perf_counter() - started, 1)
        write_json(out / "metrics.json", metrics)
        mlflow.log_metrics({k.replace("/", "."): float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
        mlflow.log_artifact(str(out / "metrics.json"))

    best = min(p.methods, key=lambda m: metrics[f"fid/{m}"])
    print(f"eval_inpaint: {len(p.methods)} methods x {len(masks)} mask sets x {n} images; "
          f"best FID {best} {metrics[f'fid/{best}']:.1f} ({metrics['seconds']:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

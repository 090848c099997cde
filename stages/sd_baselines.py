"""Stage sd_baselines: txt2img, img2img, latent inpainting and visual anagrams with converted SD v1.

    python -m stages.sd_baselines --models data/models/sd --prepared data/prepared --masks data/masks \\
        --reports reports/sd_baselines

With the weights of convert_sd (SPEC 4.8): txt2img for ``sd.prompts`` (DDIM, classifier-free
guidance), img2img (SDEdit, ``sd.strength``) and latent inpainting (mask set
``sd.inpaint_mask_set``) on the first ``sd.num_test_images`` test images, upscaled to
``sd.height`` x ``sd.width`` and made RGB, visual anagrams of ``sd.anagram_prompts``, and the SD
VAE's reconstruction PSNR/SSIM of test images at the data resolution (the numbers cache_latents
reports for our VAE) and its decoder / encoder leakage over the mask sets of ``data.mask_sets``
(``leakage.*``, as stage eval_leakage measures ours: ``decoder_leakage.tsv``, ``encoder_leakage.tsv``,
``sd_vae_leakage/<alignment>/<scalar>``). The mask alignments are those of our 8-px grid: aligned
for SD's decoder, but SD's encoder pads right/bottom before each stride-2 conv and centres latent
(i, j) on pixel (8i + 7, 8j + 7), ``sd_vae_leakage/encoder_centre_offset_px`` = 3.5 px off its tile,
so SD's encoder numbers under "aligned" are for masks offset from that encoder's grid. Figures in ``<reports>/figures/``: txt2img.png, img2img.png, inpaint.png,
anagram.png, vae_reconstruction.png. Without converted weights it draws figures/status.png and
writes metrics.json saying why, and exits 0.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import torch.nn.functional as F

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.io import write_json, write_text
from diffmodels.data.datasets import load_split
from diffmodels.data.latent_cache import ReconMetrics
from diffmodels.data.masks import load_mask_set
from diffmodels.metrics.leakage import profile_table, vae_leakage
from diffmodels.reporting.figures import labelled_grid, text_figure
from diffmodels.sd.device import choose_placement
from diffmodels.sd.vae import SCALE_FACTOR as SD_SCALE_FACTOR
from diffmodels.sd.weights import HOW_TO, load_pipeline
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "sd", "leakage", "inpaint", "data")
VAE_IMAGES = 32  # test images for the SD VAE's reconstruction metrics

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--models", type=Path, default=Path("data/models/sd"), help="convert_sd's output folder")
parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
parser.add_argument("--masks", type=Path, default=Path("data/masks"))
parser.add_argument("--reports", type=Path, default=Path("reports/sd_baselines"))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_test_images(prepared: Path, n: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The first ``n`` test images as (n, 3, H, W) float in [0, 1]: grey repeated to RGB, bilinear to ``size``."""
    images = np.array(load_split(prepared, "test").images[:n])  # copy: the split is memory-mapped
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x if size is None else F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1], over the pixels ``where`` is True (all by default)."""
    err = (a.float().cpu() - b.float().cpu()) ** 2
    mse = err.mean() if where is None else err[where.expand_as(err)].mean()
    return float(10 * torch.log10(1 / mse.clamp(min=1e-12)))


def wrap(text: str, width: int = 28) -> str:
    return textwrap.fill(text, width)


def skip(args, reason: str) -> None:
    text_figure(args.reports / "figures" / "status.png", "sd_baselines: skipped", [reason, "", "To run it, " + HOW_TO])
    write_json(args.reports / "metrics.json", {"status": "skipped", "reason": reason, "how_to": HOW_TO})
    mlflow.set_tag("sd_status", "skipped")
    mlflow.log_artifact(str(args.reports / "metrics.json"))
    print(f"sd_baselines: skipped, {reason}")


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.sd, params.seed
    weights = args.models / "sd.safetensors"
    out = args.reports / "figures"
    shutil.rmtree(out, ignore_errors=True)  # figures of an earlier run (with or without weights) go
    for stale in ("decoder_leakage.tsv", "encoder_leakage.tsv"):
        (args.reports / stale).unlink(missing_ok=True)
    with tracking.stage_run("sd_baselines", params, GROUPS):
        if not weights.is_file():
            status = args.models / "status.json"
            reason = json.loads(status.read_text()).get("reason") if status.is_file() else None
            return skip(args, reason or f"{weights} not found (run the convert_sd stage)")
        placement = choose_placement(p.device, p.dtype, p.vae_dtype, p.offload)
        sd, meta = load_pipeline(weights, placement)
        m = sd.size_multiple
        if p.height % m or p.width % m:
            raise DiffmodelsError(f"sd.height and sd.width must be multiples of {m} for this model (got {p.height}x{p.width})")
        size, negative = (p.height, p.width), p.negative_prompt or ""
        common = dict(steps=p.steps, guidance=p.guidance)
        metrics: dict = {"status": "ran", "architecture": meta["architecture"], "device": str(placement.device),
                         "dtype": str(placement.dtype).removeprefix("torch."), "steps": p.steps, "guidance": p.guidance,
                         "height": p.height, "width": p.width}  # fmt: skip
        figures: list[Path] = []

        def timed(name: str, count: int, fn):
            started = time.perf_counter()
            result = fn()
            metrics[f"{name}_seconds_per_image"] = round((time.perf_counter() - started) / count, 3)
            return result

        def batched(fn, items: list, offset: int) -> torch.Tensor:
            """``fn(batch, generator)`` over batches of ``sd.batch_size``, each seeded from ``seed``."""
            return torch.cat([fn(items[i : i + p.batch_size], torch.Generator().manual_seed(seed + offset + i)).cpu()
                              for i in range(0, len(items), p.batch_size)])  # fmt: skip

        # 1. txt2img
        prompts = list(p.prompts)
        images = timed("txt2img", len(prompts), lambda: batched(
            lambda b, g: sd.txt2img(b, height=p.height, width=p.width, negative=[negative] * len(b), generator=g, **common),
            prompts, 0))  # fmt: skip
        labelled_grid([list(to_uint8(images))], out / "txt2img.png", col_labels=[wrap(t) for t in prompts],
                      title=f"txt2img: DDIM {p.steps} steps, guidance {p.guidance:g}", cell_inches=2.4)  # fmt: skip
        figures.append(out / "txt2img.png")

        # 2. img2img (SDEdit) on test images
        init = load_test_images(args.prepared, p.num_test_images, size)
        n = len(init)
        idx = list(range(n))
        edited = timed("img2img", n, lambda: batched(
            lambda b, g: sd.img2img(init[b], [p.image_prompt] * len(b), strength=p.strength, negative=[negative] * len(b), generator=g, **common),
            idx, 100))  # fmt: skip
        metrics["img2img_psnr_to_input"] = round(psnr(edited, init), 3)
        labelled_grid([[a, b] for a, b in zip(to_uint8(init), to_uint8(edited))], out / "img2img.png",
                      col_labels=["input", f"img2img (strength {p.strength:g})"], title=wrap(p.image_prompt, 60), cell_inches=2.0)  # fmt: skip
        figures.append(out / "img2img.png")

        # 3. latent inpainting with the prepare stage's masks
        masks = torch.from_numpy(load_mask_set(args.masks, p.inpaint_mask_set)[:n]).float()[:, None]
        if len(masks) < n:
            raise DiffmodelsError(f"{args.masks / p.inpaint_mask_set}: {len(masks)} masks for {n} test images (raise data.masks_per_set)")
        masks = F.interpolate(masks, size=size, mode="nearest")
        filled = timed("inpaint", n, lambda: batched(
            lambda b, g: sd.inpaint(init[b], masks[b], [p.image_prompt] * len(b), negative=[negative] * len(b), generator=g, **common),
            idx, 200))  # fmt: skip
        keep = masks < 0.5
        metrics["inpaint_known_psnr"] = round(psnr(filled, init, keep), 3)  # the kept region after the VAE round trip
        metrics["inpaint_hole_fraction"] = round(float(masks.mean()), 4)
        holed = init * keep + 0.5 * ~keep
        labelled_grid([[a, b, c] for a, b, c in zip(to_uint8(init), to_uint8(holed), to_uint8(filled))], out / "inpaint.png",
                      col_labels=["input", f"hole ({p.inpaint_mask_set})", "inpainted"], title=wrap(p.image_prompt, 60), cell_inches=2.0)  # fmt: skip
        figures.append(out / "inpaint.png")

        # 4. visual anagrams: two samples, each shown upright and flipped
        a, b = p.anagram_prompts
        pairs = timed("anagram", 2, lambda: sd.anagram([a, a], [b, b], flip=p.anagram_flip, height=p.height, width=p.width,
                                                       negative=[negative] * 2, generator=torch.Generator().manual_seed(seed + 300),
                                                       **common).cpu())  # fmt: skip
        view = {"vertical": lambda x: x[::-1], "horizontal": lambda x: x[:, ::-1], "rot180": lambda x: x[::-1, ::-1]}[p.anagram_flip]
        labelled_grid([[x, view(x)] for x in to_uint8(pairs)], out / "anagram.png",
                      col_labels=[wrap(a), wrap(f"{b} ({p.anagram_flip} flip)")], title="Visual anagram", cell_inches=2.4)  # fmt: skip
        figures.append(out / "anagram.png")

        # 5. the SD VAE on test images at the data resolution (posterior mean), as cache_latents for ours
        originals = load_test_images(args.prepared, VAE_IMAGES)
        if originals.shape[-1] % sd.vae_factor == 0:
            recon = ReconMetrics()
            with sd.placement.running(sd.vae), torch.no_grad():
                x = originals.to(sd.device, placement.vae_dtype) * 2 - 1
                mean, _ = sd.vae.encode(x)
                x_hat = sd.vae.decode(mean).float().clamp(-1, 1).cpu()
            recon.update(to_uint8(originals), x_hat)
            metrics.update({f"sd_vae_{k}": round(v, 4) for k, v in recon.compute().items()})
            metrics["sd_vae_images"] = len(originals)
            labelled_grid([list(to_uint8(originals[:8])), list(to_uint8(x_hat[:8] / 2 + 0.5))], out / "vae_reconstruction.png",
                          row_labels=["test", "SD VAE"], title="SD VAE reconstruction (posterior mean)")  # fmt: skip
            figures.append(out / "vae_reconstruction.png")

            # 6. the SD VAE's leakage across our mask sets, as eval_leakage measures ours (SPEC 4.8)
            lp = params.leakage
            masks = {name: load_mask_set(args.masks, name, originals.shape[-1]) for name in params.data.mask_sets}
            k = min(lp.num_images, len(originals), *(len(v) for v in masks.values()))
            started = time.perf_counter()
            with sd.placement.running(sd.vae), torch.no_grad():
                leak = vae_leakage(lambda im: sd.vae.encode(im.to(placement.vae_dtype))[0].float(),
                                   lambda z: sd.vae.decode(z.to(placement.vae_dtype)).float(),
                                   originals[:k].to(sd.device) * 2 - 1, masks, samples=lp.samples,
                                   scale_factor=SD_SCALE_FACTOR, mask_policy=params.inpaint.mask_policy,
                                   generator=torch.Generator().manual_seed(seed + 400))
            metrics.update({f"sd_vae_leakage/{key}": value for key, value in leak.scalars().items()})
            # "aligned" is aligned for SD's decoder; its encoder centres latents 3.5 px off the grid,
            # so its enc_leak_mean under "aligned" masks is measured with offset masks: say so.
            metrics["sd_vae_leakage/encoder_centre_offset_px"] = sd.vae.encoder_centre_offset_px
            metrics["sd_vae_leakage_seconds"] = round(time.perf_counter() - started, 1)
            write_text(args.reports / "decoder_leakage.tsv", profile_table(leak.decoder))
            write_text(args.reports / "encoder_leakage.tsv", profile_table(leak.encoder))

        write_json(args.reports / "metrics.json", metrics)
        mlflow.set_tags({"sd_status": "ran", "sd_device": metrics["device"], "sd_dtype": metrics["dtype"]})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in [args.reports / "metrics.json", *args.reports.glob("*.tsv")]:
            mlflow.log_artifact(str(path))
        if params.tracking.log_images:
            for path in figures:
                mlflow.log_artifact(str(path), artifact_path="figures")
    print(f"sd_baselines: {len(prompts)} txt2img, {n} img2img and inpainting, 2 anagrams at {p.height}x{p.width} on "
          f"{metrics['device']} ({metrics['dtype']}); {metrics['txt2img_seconds_per_image']:.1f} s per txt2img image")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

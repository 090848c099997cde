"""Stage sd_baselines: txt2img, img2img, latent inpainting and visual anagrams with converted SD v1.

    python3 -m stages.sd_baselines --models data/models/sd --prepared data/prepared --masks data/masks \\
        --reports reports/sd_baselines

With the weights of convert_sd (:mod:`diffmodels.sd.baselines`): txt2img for ``sd.prompts`` (DDIM,
classifier-free guidance), img2img (SDEdit, ``sd.strength``) and latent inpainting (mask set
``sd.inpaint_mask_set``) on the first ``sd.num_test_images`` test images, upscaled to
``sd.height`` x ``sd.width`` and made RGB, visual anagrams of ``sd.anagram_prompts``, and the SD
VAE's reconstruction PSNR/SSIM of test images at the data resolution (the numbers cache_latents
reports for our VAE) and its decoder / encoder leakage over the mask sets of ``data.mask_sets``
(``leakage.*``, as stage eval_leakage measures ours: ``decoder_leakage.tsv``, ``encoder_leakage.tsv``,
``sd_vae_leakage/<alignment>/<scalar>``). The mask alignments are those of our 8-px grid: aligned
for SD's decoder, but SD's encoder pads right/bottom before each stride-2 conv and centres latent
(i, j) on pixel (8i + 7, 8j + 7), ``sd_vae_leakage/encoder_centre_offset_px`` = 3.5 px off its tile,
so SD's encoder numbers under "aligned" are for masks offset from that encoder's grid. Figures in
``<reports>/figures/``: txt2img.png, img2img.png, inpaint.png, anagram.png, vae_reconstruction.png.
Without converted weights it draws figures/status.png and writes metrics.json saying why, and exits 0.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import torch

from diffmodels.core import tracking
from diffmodels.core.config import SdParams, load_params
from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.io import write_json, write_text
from diffmodels.data.masks import load_mask_set
from diffmodels.metrics.leakage import profile_table
from diffmodels.reporting.figures import labelled_grid, text_figure
from diffmodels.sd import baselines
from diffmodels.sd.baselines import to_uint8
from diffmodels.sd.device import choose_placement
from diffmodels.sd.weights import HOW_TO, load_pipeline
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "sd", "leakage", "inpaint", "data")
VAE_IMAGES = 32  # test images for the SD VAE's reconstruction metrics

parser = base_parser(
    __doc__.splitlines()[0],
    "models",
    "prepared",
    "masks",
    "reports",
    models="convert_sd's output folder",
)


def wrap(text: str, width: int = 28) -> str:
    return textwrap.fill(text, width)


def skip(args, reason: str) -> None:
    text_figure(args.reports / "figures" / "status.png", "sd_baselines: skipped", [reason, "", "To run it, " + HOW_TO])
    write_json(args.reports / "metrics.json", {"status": "skipped", "reason": reason, "how_to": HOW_TO})
    tracking.set_tags({"sd_status": "skipped"})
    tracking.log_artifact(str(args.reports / "metrics.json"))
    print(f"sd_baselines: skipped, {reason}")


def sampling_figures(out: Path, p: SdParams, images: torch.Tensor, init: torch.Tensor, edited: torch.Tensor,
                     masks: torch.Tensor, filled: torch.Tensor, pairs: torch.Tensor) -> list[Path]:
    """txt2img.png, img2img.png, inpaint.png and anagram.png in ``out``."""
    labelled_grid([list(to_uint8(images))], out / "txt2img.png", col_labels=[wrap(t) for t in p.prompts],
                  title=f"txt2img: DDIM {p.steps} steps, guidance {p.guidance:g}", cell_inches=2.4)
    labelled_grid([[a, b] for a, b in zip(to_uint8(init), to_uint8(edited))], out / "img2img.png",
                  col_labels=["input", f"img2img (strength {p.strength:g})"], title=wrap(p.image_prompt, 60),
                  cell_inches=2.0)
    keep = masks < 0.5
    holed = init * keep + 0.5 * ~keep
    labelled_grid([[a, b, c] for a, b, c in zip(to_uint8(init), to_uint8(holed), to_uint8(filled))],
                  out / "inpaint.png", col_labels=["input", f"hole ({p.inpaint_mask_set})", "inpainted"],
                  title=wrap(p.image_prompt, 60), cell_inches=2.0)
    a, b = p.anagram_prompts
    view = baselines.flip_view(p.anagram_flip)
    labelled_grid([[x, view(x)] for x in to_uint8(pairs)], out / "anagram.png",
                  col_labels=[wrap(a), wrap(f"{b} ({p.anagram_flip} flip)")], title="Visual anagram", cell_inches=2.4)
    return [out / name for name in ("txt2img.png", "img2img.png", "inpaint.png", "anagram.png")]


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
            raise DiffmodelsError(f"sd.height and sd.width must be multiples of {m} for this model "
                                  f"(got {p.height}x{p.width})")
        size = (p.height, p.width)
        metrics: dict = {"status": "ran", "architecture": meta["architecture"], "device": str(placement.device),
                         "dtype": str(placement.dtype).removeprefix("torch."), "steps": p.steps, "guidance": p.guidance,
                         "height": p.height, "width": p.width}  # fmt: skip

        # txt2img, img2img (SDEdit) and latent inpainting of test images, visual anagrams
        images = baselines.txt2img(sd, p, seed, metrics)
        init = baselines.load_test_images(args.prepared, p.num_test_images, size)
        edited = baselines.img2img(sd, p, init, seed + 100, metrics)
        masks = baselines.inpaint_masks(args.masks, p.inpaint_mask_set, len(init), size)
        filled = baselines.inpaint(sd, p, init, masks, seed + 200, metrics)
        pairs = baselines.anagram(sd, p, seed + 300, metrics)
        figures = sampling_figures(out, p, images, init, edited, masks, filled, pairs)

        # the SD VAE on test images at the data resolution (posterior mean), as cache_latents for ours,
        # and its leakage across our mask sets, as eval_leakage measures ours
        originals = baselines.load_test_images(args.prepared, VAE_IMAGES)
        if originals.shape[-1] % sd.vae_factor == 0:
            x_hat = baselines.vae_reconstruction(sd, originals, metrics)
            labelled_grid([list(to_uint8(originals[:8])), list(to_uint8(x_hat[:8] / 2 + 0.5))],
                          out / "vae_reconstruction.png", row_labels=["test", "SD VAE"],
                          title="SD VAE reconstruction (posterior mean)")
            figures.append(out / "vae_reconstruction.png")
            mask_sets = {name: load_mask_set(args.masks, name, originals.shape[-1]) for name in params.data.mask_sets}
            leak = baselines.vae_leakage_scores(sd, originals, mask_sets, params.leakage, params.inpaint.mask_policy,
                                                seed + 400, metrics)
            write_text(args.reports / "decoder_leakage.tsv", profile_table(leak.decoder))
            write_text(args.reports / "encoder_leakage.tsv", profile_table(leak.encoder))

        write_json(args.reports / "metrics.json", metrics)
        tracking.set_tags({"sd_status": "ran", "sd_device": metrics["device"], "sd_dtype": metrics["dtype"]})
        tracking.log_metrics(metrics)
        for path in [args.reports / "metrics.json", *args.reports.glob("*.tsv")]:
            tracking.log_artifact(str(path))
        if params.tracking.log_images:
            for path in figures:
                tracking.log_artifact(str(path), artifact_path="figures")
    print(f"sd_baselines: {len(p.prompts)} txt2img, {len(init)} img2img and inpainting, 2 anagrams at "
          f"{p.height}x{p.width} on {metrics['device']} ({metrics['dtype']}); "
          f"{metrics['txt2img_seconds_per_image']:.1f} s per txt2img image")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

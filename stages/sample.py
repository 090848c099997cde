"""Stage sample: EMA denoiser + VAE -> sample grids, process figures and FID/KID per sampler.

    python3 -m stages.sample --ddpm data/models/ddpm.safetensors --vae data/models/vae.safetensors \\
        --latents data/latents --fid-reference data/fid/test_features.safetensors --reports reports/sample

Samplers: ancestral DDPM over all T steps (``sample.ddpm_images`` samples) and DDIM with
``sample.ddim_steps`` (``sample.ddim_images``), from the same initial noise
(:mod:`diffmodels.diffusion.sampling`). Each is scored by
:func:`~diffmodels.metrics.scores.score_features`: FID with its bootstrap interval and the floor
at its n, KID with its interval, precision / recall / density / coverage, written to
``metrics.json`` under ``scores/<sampler>`` (the key contract of :mod:`diffmodels.metrics.scores`).
Figures (``reports/sample/figures/``,
:mod:`diffmodels.reporting.sampling_figures`):

    ddpm_samples.png / ddim_samples.png   unconditional samples (null label when class-conditional)
    guidance_<w>.png                      one row per class at each guidance scale w
    denoising_strip.png                   decoded x0 estimates along a DDIM trajectory
    forward_strip.png                     test images noised to increasing t, decoded
    why_iterate.png                       at three t: the noisy latent decoded, a blur of it, the
                                          one-step x0 estimate, and iterative DDIM from t
    anagram.png                           a visual anagram: one class upright, another upside down

Class-conditional models also get ``per_class`` in ``metrics.json``: ``sample.per_class_images``
DDIM samples of each class, guided at ``sample.per_class_guidance``, scored with precision /
recall / density / coverage against the reference images of that class (``fid_reference``'s
labels), and the mean over classes; pooled metrics cannot tell a model that mixes classes up.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.checkpoint import load_checkpoint
from diffmodels.core.config import Params, SampleParams, load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError, DiffmodelsError
from diffmodels.core.io import write_json
from diffmodels.data import latent_cache
from diffmodels.data.images import make_grid, save_png, to_uint8
from diffmodels.diffusion.denoiser import load_denoiser
from diffmodels.diffusion.sampling import class_batches, sample_batches, seeded_noise
from diffmodels.metrics.fid import EXTRACTOR, InceptionFeatures, inception_features
from diffmodels.metrics.intervals import fid_floor
from diffmodels.metrics.manifold import per_class_metrics
from diffmodels.metrics.scores import K_DC, K_PR, format_scores, rounded, score_features
from diffmodels.models.vae import load_vae
from diffmodels.reporting import sampling_figures as figs
from diffmodels.training.state import derived_seed
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "sample", "eval")

parser = base_parser(__doc__.splitlines()[0], "ddpm", "vae", "latents", "fid-reference", "reports")


def check(p: SampleParams, num_steps: int, class_names: list[str]) -> None:
    """The sample params that depend on the trained denoiser (its T and classes)."""
    too_late = [t for t in p.why_iterate_steps if t > num_steps]
    if too_late:
        raise DiffmodelsError(f"sample.why_iterate_steps has {too_late[0]}, beyond the denoiser's {num_steps} steps "
                              "(ddpm.num_steps)")
    if class_names and max(p.anagram_classes) >= len(class_names):
        raise DiffmodelsError(f"sample.anagram_classes {list(p.anagram_classes)} must be class indices below "
                              f"{len(class_names)}")
    if p.ddim_steps > num_steps:
        raise DiffmodelsError(f"sample.ddim_steps {p.ddim_steps} exceeds the denoiser's {num_steps} steps "
                              "(ddpm.num_steps)")


def score(real: torch.Tensor, fake: torch.Tensor, params: Params, floors: dict[int, dict]) -> dict:
    """The scores dict of generated features ``fake`` against ``real``; the FID floor is computed
    once per n (``floors``) and shared by every set of that size."""
    e = params.eval
    if len(fake) not in floors:
        floors[len(fake)] = fid_floor(real, len(fake), repeats=e.floor_repeats, seed=params.seed)
    return score_features(real, fake, kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size, seed=params.seed,
                          fid_bootstrap=e.fid_bootstrap, floor=floors[len(fake)])


def sample_and_score(name: str, sample: Callable[..., Iterator[torch.Tensor]], num_images: int, decode,
                     real: torch.Tensor, extractor: InceptionFeatures, params: Params, device: torch.device,
                     metrics: dict, floors: dict[int, dict]) -> np.ndarray:
    """``num_images`` decoded samples (N, H, W, C) uint8 of sampler ``name``; their time per image
    and scores against the test features ``real`` go into ``metrics``."""
    started = time.perf_counter()
    images = np.concatenate([decode(z) for z in sample(name, num_images=num_images)])
    metrics[f"seconds_per_image_{name}"] = round((time.perf_counter() - started) / len(images), 4)
    started = time.perf_counter()
    feats = inception_features(images, extractor, params.eval.fid_batch_size, device)
    metrics["scores"][name] = rounded(score(real, feats, params, floors))
    metrics[f"seconds_scoring_{name}"] = round(time.perf_counter() - started, 1)
    return images


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.sample, params.seed
    device = select_device("auto")
    model, schedule, meta = load_denoiser(args.ddpm, device)
    vae, _ = load_vae(args.vae, device)
    scale, prediction = float(meta["scale_factor"]), meta["prediction"]
    class_names, null = meta.get("class_names", []), model.null_label
    shape = (model.config.in_channels, model.config.latent_size, model.config.latent_size)
    check(p, schedule.num_steps, class_names)
    reference = load_checkpoint(args.fid_reference).tensors
    real, labels = reference["features"], reference.get("labels")
    test = latent_cache.load_split(args.latents, "test")["mean"][:4].to(device) * scale
    out = args.reports / "figures"
    torch.set_grad_enabled(False)

    def decode(z: torch.Tensor) -> np.ndarray:
        return to_uint8(vae.decode(z.to(device) / scale)).cpu().numpy()

    def unconditional(x, t):
        return model(x, t, None)  # the null label when class-conditional

    extractor = InceptionFeatures()
    metrics: dict = {"fid_extractor": EXTRACTOR, "num_real": len(real), "scores": {}}
    floors: dict[int, dict] = {}
    figures: list[Path] = []
    kw = dict(ddim_steps=p.ddim_steps, prediction=prediction, decode=decode)
    sample = functools.partial(sample_batches, denoise_fn=unconditional, schedule=schedule, latent_shape=shape,
                               batch_size=p.batch_size, seed=seed, device=device,
                               prediction=prediction, ddpm_variance=p.ddpm_variance, ddim_steps=p.ddim_steps,
                               ddim_eta=p.ddim_eta)
    with tracking.stage_run("sample", params, GROUPS):
        # 1. unconditional samples, both samplers from the same x_T, timed and scored
        for name, count in (("ddpm", p.ddpm_images), ("ddim", p.ddim_images)):
            images = sample_and_score(name, sample, count, decode, real, extractor, params, device, metrics, floors)
            save_png(out / f"{name}_samples.png", make_grid(images[:64]))
            figures.append(out / f"{name}_samples.png")
        # 2.-4. the process: a denoising strip, forward diffusion, one step vs iterating
        x, eps = seeded_noise((4, *shape), seed + 7, device), seeded_noise(tuple(test.shape), seed + 3, device)
        figures.append(figs.denoising_strip(out / "denoising_strip.png", unconditional, x, schedule,
                                            points=p.strip_points, **kw))
        figures.append(figs.forward_strip(out / "forward_strip.png", test, eps, schedule, decode))
        figures.append(figs.why_iterate(out / "why_iterate.png", unconditional, test[:1], eps[:1], schedule,
                                        levels=p.why_iterate_steps, **kw))
        # 5. class-conditional rows per guidance scale, and a visual anagram
        if class_names:
            x = seeded_noise((figs.PER_CLASS * len(class_names), *shape), seed + 11, device)
            figures += figs.guidance_grids(out, model, null, class_names, x, schedule, scales=p.guidance_scales, **kw)
            x = seeded_noise((figs.PER_CLASS, *shape), seed + 13, device)
            figures.append(figs.anagram(out / "anagram.png", model, null, p.anagram_classes, class_names,
                                        p.anagram_guidance, x, schedule, **kw))

        # 6. class-conditional: precision / recall per class against that class's reference images
        if class_names and p.per_class_images:
            if labels is None:
                raise DataError(f"{args.fid_reference}: no class labels for per-class precision / recall; "
                                "run `dvc repro fid_reference` (or set sample.per_class_images: 0)")
            metrics["per_class"] = per_class_scores(model, null, class_names, labels, real, extractor, params,
                                                    schedule, shape, prediction, decode, device)

        write_json(args.reports / "metrics.json", metrics)
        tracking.log_metrics(metrics)
        tracking.set_tags({"fid_extractor": EXTRACTOR})
        tracking.log_artifact(str(args.reports / "metrics.json"))
        if params.tracking.log_images:
            for path in figures:
                tracking.log_artifact(str(path), artifact_path="figures")

    for name in ("ddpm", "ddim"):
        print("sample: " + format_scores(name if name == "ddpm" else f"ddim-{p.ddim_steps}", metrics["scores"][name]))
        note = metrics["scores"][name]["floor_note"]
        if note:
            print(f"sample: {name}: {note}")
    print(f"sample: {metrics['seconds_per_image_ddpm']:.2f} / {metrics['seconds_per_image_ddim']:.3f} s per image "
          "(DDPM / DDIM)")
    if "per_class" in metrics:
        print(per_class_table(metrics["per_class"]), end="")


PER_CLASS_KEYS = ("precision", "recall", "density", "coverage")


def per_class_scores(model, null: int, class_names: list[str], labels: torch.Tensor, real: torch.Tensor,
                     extractor: InceptionFeatures, params: Params, schedule, shape, prediction, decode,
                     device: torch.device) -> dict:
    """``sample.per_class_images`` guided DDIM samples of every class, scored per class by
    :func:`~diffmodels.metrics.manifold.per_class_metrics`; plus their mean over the classes."""
    p = params.sample
    feats = {}
    for c in range(len(class_names)):
        batches = class_batches(model, null, c, p.per_class_guidance, schedule, shape, num_images=p.per_class_images,
                                batch_size=p.batch_size, seed=derived_seed(params.seed, "per-class samples", c),
                                device=device, prediction=prediction, ddim_steps=p.ddim_steps, ddim_eta=p.ddim_eta)
        images = np.concatenate([decode(z) for z in batches])
        feats[c] = inception_features(images, extractor, params.eval.fid_batch_size, device)
    scores = per_class_metrics(real, labels, feats, K_PR, K_DC)  # None for classes with too few images
    classes = {class_names[c]: rounded({k: v for k, v in s.items() if k not in ("k_pr", "k_dc")})
               for c, s in scores.items()}
    scored = [s for s in classes.values() if s["precision"] is not None]
    mean = {k: round(float(np.mean([s[k] for s in scored])), 5) if scored else None for k in PER_CLASS_KEYS}
    return {"sampler": f"ddim-{p.ddim_steps}", "guidance": p.per_class_guidance, "images_per_class": p.per_class_images,
            "k_pr": K_PR, "k_dc": K_DC, "classes": classes, "mean": mean}



def per_class_table(pc: dict) -> str:
    """The per-class scores as printed lines: a header, one line per class, the mean."""
    head = (f"sample: per class ({pc['sampler']}, guidance {pc['guidance']:g}, n = {pc['images_per_class']} "
            f"per class against that class's reference images)\n")
    rows = [f"  {'class':<12}" + "".join(f"{k:>10}" for k in PER_CLASS_KEYS) + f"{'n real':>8}\n"]
    for name, s in [*pc["classes"].items(), ("mean", pc["mean"])]:
        cells = "".join(f"{s[k]:>10.3f}" if s[k] is not None else f"{'-':>10}" for k in PER_CLASS_KEYS)
        rows.append(f"  {name:<12}{cells}{s.get('num_real', ''):>8}\n")
    return head + "".join(rows)


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

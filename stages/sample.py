"""Stage sample: EMA denoiser + VAE -> sample grids, process figures and FID/KID per sampler.

    python -m stages.sample --ddpm data/models/ddpm.safetensors --vae data/models/vae.safetensors \\
        --latents data/latents --fid-reference data/fid/test_features.safetensors --reports reports/sample

Samplers: ancestral DDPM over all T steps (SPEC 5.4) and DDIM with ``sample.ddim_steps``, from the
same initial noise. Figures (``reports/sample/figures/``):

    ddpm_samples.png / ddim_samples.png   unconditional samples (null label when class-conditional)
    guidance_<w>.png                      one row per class at each guidance scale w
    denoising_strip.png                   decoded x0 estimates along a DDIM trajectory
    forward_strip.png                     test images noised to increasing t, decoded
    why_iterate.png                       at three t: the noisy latent decoded, a blur of it, the
                                          one-step x0 estimate, and iterative DDIM from t
    anagram.png                           a visual anagram: one class upright, another upside down
"""

from __future__ import annotations

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
from diffmodels.core.errors import DiffmodelsError
from diffmodels.core.io import write_json
from diffmodels.data import latent_cache
from diffmodels.data.images import make_grid, save_png, to_uint8
from diffmodels.diffusion.denoiser import load_denoiser
from diffmodels.diffusion.samplers import (
    Step,
    classifier_free_guidance,
    ddim_steps,
    ddim_timesteps,
    ddpm_steps,
    visual_anagram,
)
from diffmodels.diffusion.samplers import (
    run as run_sampler,
)
from diffmodels.metrics.fid import (
    EXTRACTOR,
    InceptionFeatures,
    fid_kid,
    inception_features,
)
from diffmodels.models.vae import load_vae
from diffmodels.reporting.figures import gaussian_blur, labelled_grid
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "sample", "eval")

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--ddpm", type=Path, default=Path("data/models/ddpm.safetensors"))
parser.add_argument("--vae", type=Path, default=Path("data/models/vae.safetensors"))
parser.add_argument("--latents", type=Path, default=Path("data/latents"))
parser.add_argument("--fid-reference", type=Path, default=Path("data/fid/test_features.safetensors"))
parser.add_argument("--reports", type=Path, default=Path("reports/sample"))


def run(args) -> None:
    params = load_params(args.params)
    p, seed = params.sample, params.seed
    device = select_device("auto")
    model, schedule, meta = load_denoiser(args.ddpm, device)
    vae, _ = load_vae(args.vae, device)
    scale, prediction, T = float(meta["scale_factor"]), meta["prediction"], schedule.num_steps
    class_names, null = meta.get("class_names", []), model.null_label
    c, size = model.config.in_channels, model.config.latent_size
    too_late = [t for t in p.why_iterate_steps if t > T]
    if too_late:
        raise DiffmodelsError(f"sample.why_iterate_steps has {too_late[0]}, beyond the denoiser's {T} steps (ddpm.num_steps)")
    if class_names and max(p.anagram_classes) >= len(class_names):
        raise DiffmodelsError(f"sample.anagram_classes {list(p.anagram_classes)} must be class indices below {len(class_names)}")
    if p.ddim_steps > T:
        raise DiffmodelsError(f"sample.ddim_steps {p.ddim_steps} exceeds the denoiser's {T} steps (ddpm.num_steps)")
    real = load_checkpoint(args.fid_reference).tensors["features"]
    test = latent_cache.load_split(args.latents, "test")["mean"][:4].to(device) * scale
    out = args.reports / "figures"
    torch.set_grad_enabled(False)

    def decode(z: torch.Tensor) -> np.ndarray:
        return to_uint8(vae.decode(z.to(device) / scale)).cpu().numpy()

    def unconditional(x, t):
        return model(x, t, None)  # the null label when class-conditional

    def noise(n: int, offset: int) -> torch.Tensor:
        return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed + offset)).to(device)

    extractor = InceptionFeatures()
    metrics: dict = {"fid_extractor": EXTRACTOR, "num_images": p.num_images, "num_real": len(real)}
    figures: list[Path] = []
    with tracking.stage_run("sample", params, GROUPS):
        # 1. unconditional samples, both samplers from the same x_T, timed and scored
        for name in ("ddpm", "ddim"):
            images, started = [], time.perf_counter()
            for i in tqdm(range(0, p.num_images, p.batch_size), desc=name, unit="batch", disable=None):
                n = min(p.batch_size, p.num_images - i)
                g = torch.Generator().manual_seed(seed + 1000 + i)
                x = noise(n, i)
                steps = (ddpm_steps(unconditional, x, schedule, prediction=prediction, variance=p.ddpm_variance, generator=g)
                         if name == "ddpm" else
                         ddim_steps(unconditional, x, schedule, num_steps=p.ddim_steps, eta=p.ddim_eta, prediction=prediction, generator=g))
                images.append(decode(run_sampler(steps)))
            images = np.concatenate(images)
            metrics[f"seconds_per_image_{name}"] = round((time.perf_counter() - started) / p.num_images, 4)
            scores = fid_kid(real, inception_features(images, extractor, params.eval.fid_batch_size, device),
                             kid_subsets=params.eval.kid_subsets, seed=seed)
            metrics.update({f"fid_{name}": round(scores["fid"], 3), f"kid_{name}": round(scores["kid_mean"], 5),
                            f"kid_std_{name}": round(scores["kid_std"], 5)})
            save_png(out / f"{name}_samples.png", make_grid(images[:64]))
            figures.append(out / f"{name}_samples.png")

        # 2. denoising strip: decoded x0 estimates along one DDIM trajectory
        ts = ddim_timesteps(p.ddim_steps, T)
        keep = set(np.linspace(0, len(ts) - 1, p.strip_points).round().astype(int).tolist())
        snaps: list[Step] = []
        run_sampler(ddim_steps(unconditional, noise(4, 7), schedule, num_steps=p.ddim_steps, prediction=prediction),
                    callback=snaps.append)
        chosen = [s for i, s in enumerate(snaps) if i in keep]
        cols = [decode(s.x0) for s in chosen]
        labelled_grid([[col[r] for col in cols] for r in range(4)], out / "denoising_strip.png",
                      col_labels=[f"t={s.t}" for s in chosen], title="DDIM: decoded x0 estimate at each step")
        figures.append(out / "denoising_strip.png")

        # 3. forward diffusion: test latents noised to increasing t
        levels = np.linspace(0, T, 9).round().astype(int).tolist()
        eps = torch.randn(test.shape, generator=torch.Generator().manual_seed(seed + 3)).to(device)
        cols = [decode(schedule.q_sample(test, torch.full((len(test),), t, device=device), eps)) for t in levels]
        labelled_grid([[col[r] for col in cols] for r in range(len(test))], out / "forward_strip.png",
                      col_labels=[f"t={t}" for t in levels], title="Forward diffusion q(z_t | z_0), decoded")
        figures.append(out / "forward_strip.png")

        # 4. why iterate: one step from z_t vs the full reverse process from the same z_t
        z0 = test[:1]
        rows = []
        for t in p.why_iterate_steps:
            tt = torch.full((1,), t, device=device)
            zt = schedule.q_sample(z0, tt, eps[:1])
            _, x0_hat = schedule.to_eps_x0(zt, tt, unconditional(zt, tt), prediction)
            k = max(1, round(p.ddim_steps * t / T))
            path = [round(t - i * t / k) for i in range(k)]
            iterated = run_sampler(ddim_steps(unconditional, zt, schedule, prediction=prediction, timesteps=path))
            noisy = decode(zt)
            rows.append([decode(z0)[0], noisy[0], gaussian_blur(noisy, 1.5)[0], decode(x0_hat)[0], decode(iterated)[0]])
        labelled_grid(rows, out / "why_iterate.png", row_labels=[f"t={t}" for t in p.why_iterate_steps],
                      col_labels=["clean", "noisy z_t", "blur", "one step", "iterative"],
                      title="Why iterate: one-step estimate vs the reverse process")
        figures.append(out / "why_iterate.png")

        # 5. class-conditional rows per guidance scale, and a visual anagram
        if class_names:
            per_class = 6
            labels = torch.arange(len(class_names), device=device).repeat_interleave(per_class)
            x = noise(len(labels), 11)
            for w in p.guidance_scales:
                fn = classifier_free_guidance(model, labels, null, w)
                images = decode(run_sampler(ddim_steps(fn, x, schedule, num_steps=p.ddim_steps, prediction=prediction)))
                path = out / f"guidance_{w:g}.png"
                labelled_grid([list(images[i * per_class:(i + 1) * per_class]) for i in range(len(class_names))], path,
                              row_labels=class_names, title=f"classifier-free guidance w = {w:g}")
                figures.append(path)
            a, b = p.anagram_classes
            n = 6
            up = classifier_free_guidance(model, torch.full((n,), a, device=device), null, p.anagram_guidance)
            down = classifier_free_guidance(model, torch.full((n,), b, device=device), null, p.anagram_guidance)
            fn = visual_anagram(up, down, lambda z: z.flip(-2))
            images = decode(run_sampler(ddim_steps(fn, noise(n, 13), schedule, num_steps=p.ddim_steps, prediction=prediction)))
            labelled_grid([list(images), list(images[:, ::-1])], out / "anagram.png",
                          row_labels=[class_names[a], f"{class_names[b]}\n(upside down)"],
                          title="Visual anagram (latent grid flipped)")
            figures.append(out / "anagram.png")

        write_json(args.reports / "metrics.json", metrics)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tag("fid_extractor", EXTRACTOR)
        mlflow.log_artifact(str(args.reports / "metrics.json"))
        if params.tracking.log_images:
            for path in figures:
                mlflow.log_artifact(str(path), artifact_path="figures")

    print(
        f"sample: {p.num_images} images per sampler; FID DDPM {metrics['fid_ddpm']:.1f}, DDIM-{p.ddim_steps} "
        f"{metrics['fid_ddim']:.1f} vs {len(real)} test images; {metrics['seconds_per_image_ddpm']:.2f} / "
        f"{metrics['seconds_per_image_ddim']:.3f} s per image"
    )


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

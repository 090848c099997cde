"""Stage train_ddpm: cached latents -> denoiser + EMA weights (config embedded), metrics, loss curve.

    python3 -m stages.train_ddpm --latents data/latents --vae data/models/vae.safetensors \\
        --prepared data/prepared --out data/models/ddpm.safetensors --reports reports/train_ddpm \\
        --checkpoints data/checkpoints/train_ddpm

Resume: every ``ddpm.checkpoint_every`` steps the full training state (model, EMA, optimizer,
schedule, data order, RNG) goes to ``<checkpoints>/last.safetensors``, outside DVC's outs. A
rerun with the same params, data and code continues from it; otherwise it starts fresh and says
why. A non-finite loss stops the stage with the last good checkpoint kept.

Data-parallel: with ``distributed.nproc_per_node`` > 1 the stage re-runs itself under torchrun
(or run it under torchrun yourself); every process takes its share of each global batch of
``ddpm.batch_size`` and rank 0 writes the outs, checkpoints and MLflow run
(:mod:`diffmodels.training.distributed`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.device import peak_memory_mb, select_device
from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json
from diffmodels.data import latent_cache
from diffmodels.data.images import make_grid, save_png
from diffmodels.diffusion.denoiser import sample_strip, save_denoiser
from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.models.vae import load_vae
from diffmodels.training import distributed
from diffmodels.training.ema import EMA
from diffmodels.training.loop import (
    Every,
    Finished,
    LoopSettings,
    Outputs,
    Trainer,
    log_png,
)
from diffmodels.training.precision import Precision
from diffmodels.training.state import EpochSampler, derived_seed
from stages._cli import base_parser, stage_main

STAGE = "train_ddpm"
PROJECT = Path(__file__).resolve().parents[1]  # holds dvc.yaml, whose deps of this stage are its code
GROUPS = ("seed", "ddpm")

parser = base_parser(__doc__.splitlines()[0], "latents", "vae", "prepared", "out", "reports", "checkpoints")
parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after step N leaving a checkpoint, as a kill would (for tests)")


def unet_config(p, latent_shape: tuple[int, int, int], num_classes: int) -> UNetConfig:
    c, h, w = latent_shape
    if h != w:
        raise DataError(f"latents are {h}x{w}; the denoiser needs square latents (data.resolution is square)")
    return UNetConfig.from_params(p, in_channels=c, latent_size=h, num_classes=num_classes)


def run(args) -> None:
    params = load_params(args.params)
    d = params.distributed
    distributed.run_training(f"stages.{STAGE}", args.argv, select_device(params.ddpm.device), d.nproc_per_node,
                             d.backend, lambda world: train(args, params, world))


@dataclass(frozen=True)
class Latents:
    """The training split of the latent cache (posterior moments) and what the data says of classes."""

    mean: torch.Tensor  # (N, C, h, w) posterior means, unscaled
    logvar: torch.Tensor
    labels: torch.Tensor  # (N,) int64
    scale: float  # the cache's scale factor: the denoiser sees latents * scale
    class_names: list[str]
    num_classes: int  # 0: unconditional (ddpm.conditional off, or unlabelled data)


def load_latents(args, p) -> Latents:
    scale = latent_cache.read_scale_factor(args.latents)
    split = latent_cache.load_split(args.latents, "train")
    mean, logvar, labels = split["mean"], split["logvar"], split["labels"].long()
    if p.batch_size > len(mean):
        raise DataError(f"ddpm.batch_size {p.batch_size} is larger than the training set ({len(mean)} latents)")
    class_names = json.loads((args.prepared / "manifest.json").read_text()).get("class_names", [])
    num_classes = len(class_names) if p.conditional and class_names and bool((labels >= 0).all()) else 0
    return Latents(mean, logvar, labels, scale, class_names, num_classes)


def train(args, params, world: distributed.World) -> None:
    """Train in this process: the only one, or one rank of a torchrun group (rank 0 writes)."""
    p, seed, device = params.ddpm, params.seed, world.device
    started = time.perf_counter()
    # One seed drives the run: the initial weights (the global RNG, seeded here), the data order
    # (EpochSampler) and the diffusion noise (t, eps, condition drops), each its own stream.
    torch.manual_seed(seed)
    precision = Precision.from_mode(device, p.amp)
    data = load_latents(args, p)
    cfg = unet_config(p, tuple(data.mean.shape[1:]), data.num_classes)
    model = UNet(cfg).to(device)
    world.check_batch(p.batch_size, "ddpm.batch_size")
    ema = EMA(model, p.ema_decay)
    schedule = NoiseSchedule.from_kind(p.schedule, p.num_steps, p.beta_start, p.beta_end).to(device)
    settings = LoopSettings.from_params(p, stage=STAGE, project=PROJECT, checkpoints=args.checkpoints,
                                        reports=args.reports, stop_after=args.stop_after)
    trainer = Trainer(settings, world, model, params=params, groups=GROUPS,
                      identity={"latents": data.scale},  # changes with the VAE or the data
                      config=cfg.to_dict(), sampler=EpochSampler(len(data.mean), p.batch_size, seed),
                      generator=torch.Generator().manual_seed(derived_seed(seed, "diffusion noise")), precision=precision,
                      ema=ema)
    trainer.resume()
    vae, _ = load_vae(args.vae, device)  # after the resume, as ever: building it draws from the global RNG

    def loss_step(forward: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        """The DDPM objective on this process's rows of a global batch of scaled latents (the
        posterior mean or a posterior sample); the noise is drawn for the whole global batch."""
        generator = trainer.state.generator
        idx = trainer.state.sampler.next_batch()  # the same global batch on every rank
        z0 = data.mean[idx]
        if p.latent_source == "sample":
            z0 = z0 + (0.5 * data.logvar[idx]).exp() * torch.randn(z0.shape, generator=generator)
        z0 = (z0 * data.scale).to(device)
        y = data.labels[idx].to(device) if data.num_classes else None
        with precision.autocast():
            loss = diffusion_loss(forward, schedule, z0, y, generator, prediction=p.prediction,
                                  cond_dropout=p.cond_dropout if data.num_classes else 0.0,
                                  null_label=model.null_label, rows=rows)
        return {"loss": loss}

    def samples() -> np.ndarray:
        """The strip of EMA samples from fixed seeds (one per class when conditional)."""
        return sample_strip(ema.averaged(model), schedule, vae, data.scale, device, seed=seed,
                            num_images=p.sample_images, num_classes=data.num_classes, guidance=p.sample_guidance,
                            steps=p.sample_steps, prediction=p.prediction)

    def log_samples(step: int) -> None:
        if params.tracking.log_images:
            images = samples()
            log_png(make_grid(images, ncol=len(images)), f"samples/step_{step:06d}.png")

    def outputs(done: Finished) -> Outputs:
        save_denoiser(args.out, model, ema.state_dict(), denoiser_meta(params, cfg, data))
        return write_reports(args, params, trainer, samples(), data.num_classes, done, started)

    trainer.fit(loss_step, outputs, hooks=[Every(p.sample_every, log_samples)],
                run_params={"ddpm.num_parameters": num_parameters(model), "ddpm.num_classes": data.num_classes})


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def denoiser_meta(params, cfg: UNetConfig, data: Latents) -> dict:
    """The weights file's header: everything sampling needs (diffmodels.diffusion.denoiser)."""
    p = params.ddpm
    return {
        "unet": cfg.to_dict(),
        "schedule": {"kind": p.schedule, "num_steps": p.num_steps, "beta_start": p.beta_start, "beta_end": p.beta_end},
        "prediction": p.prediction,
        "scale_factor": data.scale,
        "class_names": data.class_names if data.num_classes else [],
        "step": p.steps,
        "seed": params.seed,
    }


def write_reports(args, params, trainer: Trainer, samples: np.ndarray, num_classes: int, done: Finished,
                  started: float) -> Outputs:
    """samples.png and metrics.json (also logged as MLflow metrics at the last step)."""
    p, model, device = params.ddpm, trainer.state.model, trainer.world.device
    save_png(args.reports / "samples.png", make_grid(samples, ncol=len(samples)))
    metrics = {
        "loss_last100": done.tail_mean("loss", 100),
        "steps": p.steps,
        "resumed_from_step": done.start_step,
        "steps_per_second": round(done.steps_per_second, 3),
        "latents_per_second": round(done.steps_per_second * p.batch_size, 1),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "num_parameters": num_parameters(model),
        "num_classes": num_classes,
        "precision": trainer.precision.name,
        "world_size": trainer.world.size,
        "seconds_this_run": round(time.perf_counter() - started, 1),
    }
    write_json(args.reports / "metrics.json", metrics)
    tracking.log_metrics(metrics, step=p.steps)
    artifacts = [args.reports / "metrics.json"]
    if params.tracking.log_images:
        artifacts.append(args.reports / "samples.png")
    return Outputs(artifacts, f"{p.mixer} mixer, {metrics['num_parameters']:,} params, loss "
                              f"{metrics['loss_last100']:.4f}, {metrics['latents_per_second']:.0f} latents/s "
                              f"({metrics['seconds_this_run']:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

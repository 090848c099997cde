"""Stage train_vae: data/prepared -> VAE weights (localized or conventional, config embedded), metrics, loss curve.

    python3 -m stages.train_vae --prepared data/prepared --out data/models/vae.safetensors \\
        --reports reports/train_vae --checkpoints data/checkpoints/train_vae

Resume: every ``vae.checkpoint_every`` steps the full training state goes to
``<checkpoints>/last.safetensors`` (not a DVC out, so ``dvc repro`` does not delete it). A
rerun with the same params, data and code continues from it; otherwise it starts fresh and
says why. The checkpoint is removed once the outs are written.

GAN (``vae.disc_weight`` > 0): from step ``vae.disc_start`` a PatchGAN discriminator trains
beside the VAE (diffmodels/models/discriminator.py); it is part of the resume checkpoint (weights
and Adam state) and is saved into the VAE's weights file under ``discriminator/``.

Data-parallel: with ``distributed.nproc_per_node`` > 1 the stage re-runs itself under torchrun
(or run it under torchrun yourself); every process takes its share of each global batch of
``vae.batch_size`` and rank 0 writes the outs, checkpoints and MLflow run
(:mod:`diffmodels.training.distributed`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from diffmodels.core import tracking
from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError
from diffmodels.core.io import write_json
from diffmodels.data.datasets import load_split
from diffmodels.data.images import save_png, to_model_range
from diffmodels.data.latent_cache import recon_grid, reconstruction_metrics
from diffmodels.models.discriminator import Adversary, DiscriminatorConfig, frequency_loss
from diffmodels.models.vae import (
    GRID,
    VAE,
    VAEConfig,
    locality,
    num_parameters,
    save_vae,
    vae_loss,
)
from diffmodels.training import distributed
from diffmodels.training.loop import (
    Every,
    Finished,
    LoopSettings,
    Outputs,
    Trainer,
    log_png,
    write_table,
)
from diffmodels.training.precision import Precision
from diffmodels.training.state import EpochSampler
from stages._cli import base_parser, stage_main

STAGE = "train_vae"
PROJECT = Path(__file__).resolve().parents[1]  # holds dvc.yaml, whose deps of this stage are its code
GROUPS = ("seed", "vae", "latents")

parser = base_parser(__doc__.splitlines()[0], "prepared", "out", "reports", "checkpoints")
parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after step N leaving a checkpoint, as a kill would (for tests)")


def run(args) -> None:
    params = load_params(args.params)
    d = params.distributed
    distributed.run_training(f"stages.{STAGE}", args.argv, select_device(params.vae.device), d.nproc_per_node,
                             d.backend, lambda world: train(args, params, world))


def train(args, params, world: distributed.World) -> None:
    """Train in this process: the only one, or one rank of a torchrun group (rank 0 writes)."""
    p, seed, device = params.vae, params.seed, world.device
    started = time.perf_counter()
    torch.manual_seed(seed)
    precision = Precision.from_mode(device, p.amp)
    manifest, images, val_images = load_data(args.prepared, p.batch_size)
    cfg = VAEConfig.from_params(p, in_channels=images.shape[3], latent_channels=params.latents.channels)
    model = VAE(cfg).to(device)
    adversary = None
    if p.disc_weight > 0:  # built before the resume, like the VAE: its init draws from the global RNG
        adversary = Adversary(DiscriminatorConfig(images.shape[3], p.disc_channels, p.disc_layers), lr=p.disc_lr,
                              start=p.disc_start, weight=p.disc_weight, device=device, wrap=world.wrap)
    world.check_batch(min(p.batch_size, len(images)), "vae.batch_size")
    losses = ("loss", "recon", "kl") + (("freq",) if p.freq_weight > 0 else ()) \
        + (("g_loss", "d_loss", "disc_lambda") if adversary else ())
    settings = LoopSettings.from_params(p, stage=STAGE, project=PROJECT, checkpoints=args.checkpoints,
                                        reports=args.reports, losses=losses, stop_after=args.stop_after)
    trainer = Trainer(settings, world, model, params=params, groups=GROUPS,
                      identity={"data": manifest.get("sha256")}, config=cfg.to_dict(),
                      sampler=EpochSampler(len(images), p.batch_size, seed),
                      generator=torch.Generator(device).manual_seed(seed), precision=precision,
                      extra={"val_history": []},  # (step, psnr, ssim) rows of val.tsv
                      parts={"adversary": adversary} if adversary else None)
    trainer.resume()

    latent_shape = (cfg.latent_channels, images.shape[1] // GRID, images.shape[2] // GRID)
    noise_dtype = precision.dtype or torch.float32  # the dtype of the encoder's output under autocast

    def loss_step(forward: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        """This process's rows of the global batch through the reparameterised pass; the noise is
        drawn for the whole global batch (one stream on every rank)."""
        idx = trainer.state.sampler.next_batch()  # (B,) the same global batch on every rank
        x = to_model_range(images[idx[rows]]).to(device)  # (B / world, C, H, W)
        eps = torch.randn((len(idx), *latent_shape), generator=trainer.state.generator, device=device,
                          dtype=noise_dtype)
        with precision.autocast():
            x_hat, mean, logvar = forward(x, eps=eps[rows])
        out = vae_loss(x, x_hat, mean, logvar, p.loss, p.beta_kl)
        rec = out["recon"]  # L_rec of the adaptive weight: the reconstruction terms
        if p.freq_weight > 0:
            out["freq"] = frequency_loss(x, x_hat)
            rec = rec + p.freq_weight * out["freq"]
            out["loss"] = out["loss"] + p.freq_weight * out["freq"]
        if adversary is not None:
            zero = torch.zeros((), device=device)
            out.update(g_loss=zero, d_loss=zero, disc_lambda=zero)
            if adversary.active(trainer.state.step):
                out["d_loss"] = adversary.discriminator_step(x, x_hat)
                out["g_loss"], out["disc_lambda"] = adversary.generator_term(x_hat, rec, model.last_layer)
                out["loss"] = out["loss"] + out["disc_lambda"] * out["g_loss"]
        return out

    def validate(step: int) -> None:
        """Validation PSNR/SSIM on ``vae.num_val_images`` and a reconstruction grid to MLflow."""
        metrics = reconstruction_metrics(model, val_images[: p.num_val_images], params.latents.batch_size, device)
        tracking.log_metrics(metrics, step=step, prefix="val_")
        trainer.state.extra["val_history"].append([step, metrics["psnr"], metrics["ssim"]])
        if params.tracking.log_images:
            log_png(recon_grid(model, val_images[: p.grid_images], device), f"reconstructions/step_{step:06d}.png")

    def outputs(done: Finished) -> Outputs:
        return write_outputs(args, params, trainer, val_images, done, started)

    reach = {f"vae.{k}": "none" if v is None else v for k, v in locality(cfg).items()}
    trainer.fit(loss_step, outputs, hooks=[Every(p.val_every, validate)],
                run_params={"vae.num_parameters": num_parameters(model), **reach})


def load_data(prepared: Path, batch_size: int) -> tuple[dict, torch.Tensor, np.ndarray]:
    """(manifest, train images (N, H, W, C) uint8 in memory, val images) of the prepared data."""
    manifest_path = prepared / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: prepared data missing; run `dvc repro prepare`")
    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    images = torch.from_numpy(np.array(train.images))  # copied into memory
    if batch_size > len(images):
        raise DataError(f"vae.batch_size {batch_size} is larger than the training set ({len(images)} images)")
    return json.loads(manifest_path.read_text()), images, np.asarray(val.images)


def write_outputs(args, params, trainer: Trainer, val_images: np.ndarray, done: Finished, started: float) -> Outputs:
    """Final validation on the whole val split (through the path cache_latents uses), then the
    weights with their config, val.tsv, the reconstruction grid and metrics.json."""
    p, model, device = params.vae, trainer.state.model, trainer.world.device
    final = reconstruction_metrics(model, val_images, params.latents.batch_size, device)
    tracking.log_metrics(final, step=p.steps, prefix="val_")
    val_history = trainer.state.extra["val_history"]
    val_history.append([p.steps, final["psnr"], final["ssim"]])
    metrics = {
        "val_psnr": round(final["psnr"], 4),
        "val_ssim": round(final["ssim"], 5),
        "num_val_images": len(val_images),
        "train_loss_last50": done.tail_mean("loss", 50),
        "train_recon_last50": done.tail_mean("recon", 50),
        "train_kl_last50": done.tail_mean("kl", 50),
        "steps": p.steps,
        "resumed_from_step": done.start_step,
        "num_parameters": num_parameters(model),
        "arch": model.config.arch,
        **locality(model.config),  # receptive_field local/global; decoder_halo_px null when global
        "precision": trainer.precision.name,
        "world_size": trainer.world.size,
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "seconds_per_step": round(1.0 / done.steps_per_second, 4) if done.steps_per_second else None,
    }
    adversary = trainer.state.parts.get("adversary")
    if adversary is not None:
        metrics["disc_num_parameters"] = num_parameters(adversary.model)
        metrics["train_g_loss_last50"] = done.tail_mean("g_loss", 50)
        metrics["train_d_loss_last50"] = done.tail_mean("d_loss", 50)
    save_vae(args.out, model,
             {"step": p.steps, "val_psnr": final["psnr"], "val_ssim": final["ssim"], "seed": params.seed},
             discriminator=adversary.model if adversary is not None else None)
    write_table(args.reports / "val.tsv", ("step", "val_psnr", "val_ssim"), val_history)
    save_png(args.reports / "reconstructions.png", recon_grid(model, val_images[: p.grid_images], device))
    write_json(args.reports / "metrics.json", metrics)
    artifacts = [args.reports / "metrics.json", args.reports / "val.tsv"]
    if params.tracking.log_images:
        artifacts.append(args.reports / "reconstructions.png")
    return Outputs(artifacts, f"{metrics['num_parameters']:,} params, val PSNR {final['psnr']:.2f} dB "
                              f"SSIM {final['ssim']:.4f} ({metrics['seconds_this_run']:.0f}s)")


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

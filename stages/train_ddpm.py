"""Stage train_ddpm: cached latents -> denoiser + EMA weights (config embedded), metrics, loss curve.

    python -m stages.train_ddpm --latents data/latents --vae data/models/vae.safetensors \\
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

import contextlib
import copy
import json
import resource
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from tqdm import tqdm

import diffmodels
from diffmodels.core import tracking
from diffmodels.core.config import flatten, load_params
from diffmodels.core.device import select_device
from diffmodels.core.errors import DataError
from diffmodels.core.interrupt import StopAtStepEnd
from diffmodels.core.io import write_json, write_text
from diffmodels.data import latent_cache
from diffmodels.data.images import make_grid, save_png, to_uint8
from diffmodels.diffusion.denoiser import save_denoiser
from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.samplers import classifier_free_guidance, ddim_steps
from diffmodels.diffusion.samplers import run as run_sampler
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.models.vae import load_vae
from diffmodels.training import distributed
from diffmodels.training.ema import EMA
from diffmodels.training.optim import backward_and_step, check_finite, make_scheduler
from diffmodels.training.precision import Precision
from diffmodels.training.state import (
    EpochSampler,
    TrainState,
    file_digest,
    fingerprint,
    resume,
)
from stages._cli import base_parser, stage_main

GROUPS = ("seed", "ddpm")
CODE = [Path(__file__), *(Path(diffmodels.__file__).parent / m for m in
                          ("ddpm.py", "unet.py", "serpentine.py", "ssm.py", "schedule.py", "samplers.py", "train.py",
                           "distributed.py"))]
LOSS_COLUMNS = ("step", "loss", "lr", "grad_norm")

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--latents", type=Path, default=Path("data/latents"))
parser.add_argument("--vae", type=Path, default=Path("data/models/vae.safetensors"))
parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
parser.add_argument("--out", type=Path, default=Path("data/models/ddpm.safetensors"))
parser.add_argument("--reports", type=Path, default=Path("reports/train_ddpm"))
parser.add_argument("--checkpoints", type=Path, default=Path("data/checkpoints/train_ddpm"))
parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after step N leaving a checkpoint, as a kill would (for tests)")


def unet_config(p, latent_shape: tuple[int, int, int], num_classes: int) -> UNetConfig:
    c, h, w = latent_shape
    if h != w:
        raise DataError(f"latents are {h}x{w}; the denoiser needs square latents (data.resolution is square)")
    return UNetConfig.from_params(p, in_channels=c, latent_size=h, num_classes=num_classes)


@torch.no_grad()
def sample_strip(model, schedule, vae, scale, p, num_classes: int, device, seed: int) -> np.ndarray:
    """Decoded DDIM samples from fixed seeds (one per class when conditional): (N, H, W, C) uint8."""
    n = num_classes or p.sample_images
    c, size = model.config.in_channels, model.config.latent_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g).to(device)
    if num_classes:
        labels = torch.arange(num_classes, device=device)
        denoise = classifier_free_guidance(model, labels, model.null_label, p.sample_guidance)
    else:
        denoise = lambda z, t: model(z, t)  # noqa: E731
    z0 = run_sampler(ddim_steps(denoise, x, schedule, num_steps=p.sample_steps, prediction=p.prediction, generator=g))
    return to_uint8(vae.decode(z0 / scale)).cpu().numpy()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB, whole process


def run(args) -> None:
    params = load_params(args.params)
    d = params.distributed
    distributed.run_training("stages.train_ddpm", args.argv, select_device(params.ddpm.device), d.nproc_per_node, d.backend,
                             lambda world: train(args, params, world))


def train(args, params, world: distributed.World) -> None:
    """Train in this process: the only one, or one rank of a torchrun group (rank 0 writes)."""
    p, seed = params.ddpm, params.seed
    started = time.perf_counter()
    torch.manual_seed(seed)
    device = world.device
    precision = Precision.from_mode(device, p.amp)

    # 1. data: cached posterior moments, scaled to unit variance
    scale = latent_cache.read_scale_factor(args.latents)
    train = latent_cache.load_split(args.latents, "train")
    mean, logvar, labels = train["mean"], train["logvar"], train["labels"].long()
    if p.batch_size > len(mean):
        raise DataError(f"ddpm.batch_size {p.batch_size} is larger than the training set ({len(mean)} latents)")
    class_names = json.loads((args.prepared / "manifest.json").read_text()).get("class_names", [])
    num_classes = len(class_names) if p.conditional and class_names and bool((labels >= 0).all()) else 0

    # 2. model, EMA, optimiser, resumable state
    cfg = unet_config(p, tuple(mean.shape[1:]), num_classes)
    model = UNet(cfg).to(device)
    world.check_batch(p.batch_size, "ddpm.batch_size")
    forward = world.wrap(model)  # DDP when several processes; EMA and checkpoints use the plain module
    ema = EMA(model, p.ema_decay)
    schedule = NoiseSchedule.from_kind(p.schedule, p.num_steps, p.beta_start, p.beta_end).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    state = TrainState(
        model=model, optimizer=optimizer, scheduler=make_scheduler(optimizer, p.warmup_steps, p.steps),
        sampler=EpochSampler(len(mean), p.batch_size, seed), generator=torch.Generator().manual_seed(seed),
        scaler=precision.scaler, ema=ema, extra={"history": []},
    )
    inputs = {
        "params": flatten(params, GROUPS),
        "latents": scale,  # changes with the VAE or the data
        "code": {Path(f).name: digest for f, digest in file_digest(CODE).items()},
        "precision": precision.name,
    }
    ckpt_path = args.checkpoints / "last.safetensors"
    resumed = resume(state, ckpt_path, fingerprint(inputs))
    world.check_same(state.step, "the step to resume from")
    if world.main:
        print(f"train_ddpm: {resumed}")
    start_step = state.step
    history: list[list[float]] = state.extra["history"]
    vae, _ = load_vae(args.vae, device)
    num_params = sum(p_.numel() for p_ in model.parameters())

    def ema_model() -> UNet:
        averaged = copy.deepcopy(model)
        ema.copy_to(averaged)
        return averaged.eval()

    def log_samples(step: int) -> None:
        if not params.tracking.log_images:
            return
        images = sample_strip(ema_model(), schedule, vae, scale, p, num_classes, device, seed)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"step_{step:06d}.png"
            save_png(path, make_grid(images, ncol=len(images)))
            mlflow.log_artifact(str(path), artifact_path="samples")

    def checkpoint() -> str:
        if world.main:
            state.save(ckpt_path, fingerprint(inputs), cfg.to_dict())
        return f"at step {state.step}: checkpoint saved to {ckpt_path}; rerun the stage to resume"

    stop = StopAtStepEnd(checkpoint)  # Ctrl-C / SIGTERM: save at the end of the step, then stop
    with tracking.stage_run("train_ddpm", params, GROUPS) if world.main else contextlib.nullcontext(), stop:
        if world.main:
            mlflow.set_tags({"resumed_from_step": start_step, "device": str(device), "precision": precision.name,
                             "world_size": world.size})
            mlflow.log_params({"ddpm.num_parameters": num_params, "ddpm.num_classes": num_classes,
                               **flatten(params, ["distributed"])})
        bar = tqdm(range(start_step, p.steps), initial=start_step, total=p.steps, desc="train_ddpm",
                   unit="step", mininterval=1.0, disable=None if world.main else True)
        loop_started, loop_start_step = time.perf_counter(), start_step
        for step in bar:
            # 1. a global batch of scaled latents (the same on every rank): the posterior mean, or a
            #    sample from the posterior
            idx = state.sampler.next_batch()
            z0 = mean[idx]
            if p.latent_source == "sample":
                z0 = z0 + (0.5 * logvar[idx]).exp() * torch.randn(z0.shape, generator=state.generator)
            z0 = (z0 * scale).to(device)
            y = labels[idx].to(device) if num_classes else None
            # 2. the DDPM objective on this rank's rows (noise drawn for the whole global batch)
            with precision.autocast():
                loss = diffusion_loss(forward, schedule, z0, y, state.generator, prediction=p.prediction,
                                      cond_dropout=p.cond_dropout if num_classes else 0.0,
                                      null_label=model.null_label, rows=world.rows(len(idx)))
            global_loss = world.mean(loss.detach())
            check_finite({"loss": global_loss}, step + 1, ckpt_path)
            # 3. update (DDP averages the gradients over ranks), then the moving average
            lr = state.scheduler.get_last_lr()[0]
            grad_norm = backward_and_step(loss, model, optimizer, state.scheduler, p.grad_clip, precision.scaler)
            ema.update(model)
            state.step = step + 1
            history.append([state.step, global_loss.item(), lr, grad_norm])
            bar.set_postfix(loss=f"{history[-1][1]:.4f}", refresh=False)
            # 4. logging, sample strips, checkpoints: rank 0 only
            if world.main and state.step % p.log_every == 0:
                mlflow.log_metrics({"loss": history[-1][1], "lr": lr, "grad_norm": grad_norm}, step=state.step)
            if world.main and state.step % p.sample_every == 0 and state.step < p.steps:
                log_samples(state.step)
            if state.step % p.checkpoint_every == 0 or state.step == args.stop_after:
                checkpoint()
            if args.stop_after is not None and state.step >= args.stop_after:
                bar.close()
                if world.main:
                    print(f"train_ddpm: stopped after step {state.step} as asked; rerun to resume")
                return
            stop.step_done(agree=world.any)
        bar.close()
        stop.loop_done(agree=world.any)
        if not world.main:
            return
        steps_run = p.steps - loop_start_step
        steps_per_s = steps_run / max(time.perf_counter() - loop_started, 1e-9)

        # 5. outs: weights with config, loss curve, final samples, metrics
        meta = {
            "unet": cfg.to_dict(),
            "schedule": {"kind": p.schedule, "num_steps": p.num_steps, "beta_start": p.beta_start, "beta_end": p.beta_end},
            "prediction": p.prediction,
            "scale_factor": scale,
            "class_names": class_names if num_classes else [],
            "step": p.steps,
            "seed": seed,
        }
        save_denoiser(args.out, model, ema.state_dict(), meta)
        lines = ["\t".join(LOSS_COLUMNS)] + ["\t".join([str(int(r[0]))] + [f"{v:.6g}" for v in r[1:]]) for r in history]
        write_text(args.reports / "loss.tsv", "\n".join(lines) + "\n")
        final = sample_strip(ema_model(), schedule, vae, scale, p, num_classes, device, seed)
        save_png(args.reports / "samples.png", make_grid(final, ncol=len(final)))
        tail = np.asarray([r[1] for r in history[-100:]])
        metrics = {
            "loss_last100": float(tail.mean()) if len(tail) else None,
            "steps": p.steps,
            "resumed_from_step": start_step,
            "steps_per_second": round(steps_per_s, 3),
            "latents_per_second": round(steps_per_s * p.batch_size, 1),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "num_parameters": num_params,
            "num_classes": num_classes,
            "precision": precision.name,
            "world_size": world.size,
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }
        write_json(args.reports / "metrics.json", metrics)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=p.steps)
        for path in (args.reports / "metrics.json", args.reports / "loss.tsv"):
            mlflow.log_artifact(str(path))
        if params.tracking.log_images:
            mlflow.log_artifact(str(args.reports / "samples.png"))
        ckpt_path.unlink(missing_ok=True)  # finished: the weights are the out now

    print(
        f"train_ddpm: {p.steps} steps ({start_step} resumed) on {device} {precision.name}{world.label}, {p.mixer} mixer, "
        f"{num_params:,} params, loss {metrics['loss_last100']:.4f}, {metrics['latents_per_second']:.0f} latents/s "
        f"({metrics['seconds_this_run']:.0f}s)"
    )


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

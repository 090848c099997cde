"""Stage train_vae: data/prepared -> localized VAE weights (config embedded), metrics, loss curve.

    python -m stages.train_vae --prepared data/prepared --out data/models/vae.safetensors \\
        --reports reports/train_vae --checkpoints data/checkpoints/train_vae

Resume: every ``vae.checkpoint_every`` steps the full training state goes to
``<checkpoints>/last.safetensors`` (not a DVC out, so ``dvc repro`` does not delete it). A
rerun with the same params, data and code continues from it; otherwise it starts fresh and
says why. The checkpoint is removed once the outs are written.

Data-parallel: with ``distributed.nproc_per_node`` > 1 the stage re-runs itself under torchrun
(or run it under torchrun yourself); every process takes its share of each global batch of
``vae.batch_size`` and rank 0 writes the outs, checkpoints and MLflow run
(:mod:`diffmodels.training.distributed`).
"""

from __future__ import annotations

import contextlib
import json
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
from diffmodels.core.device import evaluating, select_device
from diffmodels.core.errors import DataError
from diffmodels.core.interrupt import StopAtStepEnd
from diffmodels.core.io import write_json, write_text
from diffmodels.data.datasets import load_split
from diffmodels.data.images import (
    make_grid,
    save_png,
    to_model_range,
    to_uint8,
)
from diffmodels.data.latent_cache import reconstruction_metrics
from diffmodels.models.vae import (
    GRID,
    VAE,
    VAEConfig,
    decoder_halo,
    num_parameters,
    save_vae,
    vae_loss,
)
from diffmodels.training import distributed
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

GROUPS = ("seed", "vae", "latents")
CODE = [Path(__file__), *(Path(diffmodels.__file__).parent / m for m in ("vae.py", "train.py", "latents.py", "distributed.py"))]
LOSS_COLUMNS = ("step", "loss", "recon", "kl", "lr", "grad_norm")

parser = base_parser(__doc__.splitlines()[0])
parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
parser.add_argument("--out", type=Path, default=Path("data/models/vae.safetensors"))
parser.add_argument("--reports", type=Path, default=Path("reports/train_vae"))
parser.add_argument("--checkpoints", type=Path, default=Path("data/checkpoints/train_vae"))
parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                    help="stop after step N leaving a checkpoint, as a kill would (for tests)")


def recon_grid(model: VAE, images: np.ndarray, device: torch.device, ncol: int = 8) -> np.ndarray:
    """Rows of originals each followed by a row of their reconstructions (posterior mean)."""
    with evaluating(model):
        x = to_model_range(torch.from_numpy(np.array(images))).to(device)  # a copy: images may be a read-only memmap
        recon = to_uint8(model.decode(model.encode(x)[0])).cpu().numpy()
    rows = []
    for i in range(0, len(images), ncol):
        rows += [images[i:i + ncol], recon[i:i + ncol]]
    return make_grid(np.concatenate(rows), ncol=min(ncol, len(images)))


def run(args) -> None:
    params = load_params(args.params)
    d = params.distributed
    distributed.run_training("stages.train_vae", args.argv, select_device(params.vae.device), d.nproc_per_node, d.backend,
                             lambda world: train(args, params, world))


def train(args, params, world: distributed.World) -> None:
    """Train in this process: the only one, or one rank of a torchrun group (rank 0 writes)."""
    p, seed = params.vae, params.seed
    started = time.perf_counter()
    torch.manual_seed(seed)
    device = world.device
    precision = Precision.from_mode(device, p.amp)

    manifest_path = args.prepared / "manifest.json"
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: prepared data missing; run `dvc repro prepare`")
    train, val = load_split(args.prepared, "train"), load_split(args.prepared, "val")
    images = torch.from_numpy(np.array(train.images))  # (N, H, W, C) uint8, copied into memory
    if p.batch_size > len(images):
        raise DataError(f"vae.batch_size {p.batch_size} is larger than the training set ({len(images)} images)")
    val_images = np.asarray(val.images)
    grid_images = val_images[: p.grid_images]

    cfg = VAEConfig.from_params(p, in_channels=images.shape[3], latent_channels=params.latents.channels)
    model = VAE(cfg).to(device)
    world.check_batch(min(p.batch_size, len(images)), "vae.batch_size")
    forward = world.wrap(model)  # DDP when several processes; checkpoints keep the plain module
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, p.warmup_steps, p.steps),
        sampler=EpochSampler(len(images), p.batch_size, seed),
        generator=torch.Generator(device).manual_seed(seed),
        scaler=precision.scaler,
        extra={"history": [], "val_history": []},
    )
    inputs = {
        "params": flatten(params, GROUPS),
        "data": json.loads(manifest_path.read_text()).get("sha256"),
        "code": {Path(f).name: digest for f, digest in file_digest(CODE).items()},
        "precision": precision.name,
    }
    ckpt_path = args.checkpoints / "last.safetensors"
    resumed = resume(state, ckpt_path, fingerprint(inputs))
    world.check_same(state.step, "the step to resume from")
    if world.main:
        print(f"train_vae: {resumed}")
    start_step = state.step
    history: list[list[float]] = state.extra["history"]
    val_history: list[list[float]] = state.extra.setdefault("val_history", [])  # (step, psnr, ssim)

    latent_shape = (cfg.latent_channels, images.shape[1] // GRID, images.shape[2] // GRID)
    noise_dtype = precision.dtype or torch.float32  # the dtype of the encoder's output under autocast

    def checkpoint() -> str:
        if world.main:
            state.save(ckpt_path, fingerprint(inputs), cfg.to_dict())
        return f"at step {state.step}: checkpoint saved to {ckpt_path}; rerun the stage to resume"

    stop = StopAtStepEnd(checkpoint)  # Ctrl-C / SIGTERM: save at the end of the step, then stop
    with tracking.stage_run("train_vae", params, GROUPS) if world.main else contextlib.nullcontext(), stop:
        if world.main:
            mlflow.set_tags({"resumed_from_step": start_step, "device": str(device), "precision": precision.name,
                             "world_size": world.size})
            mlflow.log_params({"vae.num_parameters": num_parameters(model), "vae.decoder_halo_px": model.decoder.halo,
                               **flatten(params, ["distributed"])})
        bar = tqdm(range(start_step, p.steps), initial=start_step, total=p.steps, desc="train_vae", unit="step",
                   mininterval=1.0, disable=not world.main)
        for step in bar:
            # 1. this process's rows of the global batch, in model range
            idx = state.sampler.next_batch()  # (B,) the same global batch on every rank
            rows = world.rows(len(idx))
            x = to_model_range(images[idx[rows]]).to(device)  # (B / world, C, H, W)
            # 2. reparameterised pass and loss; noise drawn for the global batch (one stream on every rank)
            eps = torch.randn((len(idx), *latent_shape), generator=state.generator, device=device, dtype=noise_dtype)
            with precision.autocast():
                x_hat, mean, logvar = forward(x, eps=eps[rows])
            losses = vae_loss(x, x_hat, mean, logvar, p.loss, p.beta_kl)
            global_losses = dict(zip(losses, world.mean(torch.stack(list(losses.values())).detach())))
            check_finite(global_losses, step + 1, ckpt_path)
            # 3. update (DDP averages the gradients over ranks)
            lr = state.scheduler.get_last_lr()[0]
            grad_norm = backward_and_step(losses["loss"], model, optimizer, state.scheduler, p.grad_clip, precision.scaler)
            state.step = step + 1
            row = {k: v.item() for k, v in global_losses.items()} | {"lr": lr, "grad_norm": grad_norm}
            history.append([state.step] + [row[c] for c in LOSS_COLUMNS[1:]])
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            # 4. logging, validation, checkpoints: rank 0 only
            if world.main and state.step % p.log_every == 0:
                mlflow.log_metrics(row, step=state.step)
            if world.main and state.step % p.val_every == 0 and state.step < p.steps:
                val_metrics = reconstruction_metrics(model, val_images[: p.num_val_images], params.latents.batch_size, device)
                mlflow.log_metrics({f"val_{k}": v for k, v in val_metrics.items()}, step=state.step)
                val_history.append([state.step, val_metrics["psnr"], val_metrics["ssim"]])
                log_grid(model, grid_images, device, f"reconstructions/step_{state.step:06d}.png", params.tracking.log_images)
            if state.step % p.checkpoint_every == 0 or state.step == args.stop_after:
                checkpoint()
            if args.stop_after is not None and state.step >= args.stop_after:
                bar.close()
                if world.main:
                    print(f"train_vae: stopped after step {state.step} as asked; rerun to resume")
                return
            stop.step_done(agree=world.any)
        bar.close()
        stop.loop_done(agree=world.any)
        if not world.main:
            return

        # 5. final validation on the whole val split, through the same path cache_latents uses
        final = reconstruction_metrics(model, val_images, params.latents.batch_size, device)
        mlflow.log_metrics({f"val_{k}": v for k, v in final.items()}, step=p.steps)
        val_history.append([p.steps, final["psnr"], final["ssim"]])
        tail = np.asarray(history[-min(50, len(history)):])
        metrics = {
            "val_psnr": round(final["psnr"], 4),
            "val_ssim": round(final["ssim"], 5),
            "num_val_images": len(val_images),
            "train_loss_last50": float(tail[:, 1].mean()) if len(tail) else None,
            "train_recon_last50": float(tail[:, 2].mean()) if len(tail) else None,
            "train_kl_last50": float(tail[:, 3].mean()) if len(tail) else None,
            "steps": p.steps,
            "resumed_from_step": start_step,
            "num_parameters": num_parameters(model),
            "decoder_halo_px": decoder_halo(cfg),
            "encoder_receptive_radius_px": model.encoder.receptive_radius,
            "precision": precision.name,
            "world_size": world.size,
            "seconds_this_run": round(time.perf_counter() - started, 1),
        }

        # 6. outs: weights with their config, loss curve, final grid, metrics
        save_vae(args.out, model, {"step": p.steps, "val_psnr": final["psnr"], "val_ssim": final["ssim"], "seed": seed})
        lines = ["\t".join(LOSS_COLUMNS)] + ["\t".join([str(int(r[0]))] + [f"{v:.6g}" for v in r[1:]]) for r in history]
        write_text(args.reports / "loss.tsv", "\n".join(lines) + "\n")
        val_lines = ["step\tval_psnr\tval_ssim"] + [f"{int(s)}\t{psnr:.6g}\t{ssim:.6g}" for s, psnr, ssim in val_history]
        write_text(args.reports / "val.tsv", "\n".join(val_lines) + "\n")
        save_png(args.reports / "reconstructions.png", recon_grid(model, grid_images, device))
        write_json(args.reports / "metrics.json", metrics)
        for path in (args.reports / "metrics.json", args.reports / "loss.tsv", args.reports / "val.tsv"):
            mlflow.log_artifact(str(path))
        if params.tracking.log_images:
            mlflow.log_artifact(str(args.reports / "reconstructions.png"))
        ckpt_path.unlink(missing_ok=True)  # finished: the weights are the out now

    print(
        f"train_vae: {p.steps} steps ({start_step} resumed) on {device} {precision.name}{world.label}, "
        f"{metrics['num_parameters']:,} params, val PSNR {final['psnr']:.2f} dB SSIM {final['ssim']:.4f} "
        f"({metrics['seconds_this_run']:.0f}s)"
    )


def log_grid(model: VAE, images: np.ndarray, device: torch.device, name: str, enabled: bool) -> None:
    if not enabled:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(name).name
        save_png(path, recon_grid(model, images, device))
        mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent))


main = stage_main(run, parser)

if __name__ == "__main__":
    main()

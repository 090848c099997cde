"""Data-parallel denoiser training: seconds per step with 1 and N processes, same global batch.

    python -m benchmarks.ddp_step [--nproc 1 2] [--batch 64] [--steps 20] [--out reports/bench]

For each process count the script re-runs itself under torchrun's launcher
(:func:`diffmodels.training.distributed.launch`, as the training stages do). Every worker builds the UNet
of the ``ddpm`` params (latent side ``data.resolution / 8``, ``latents.channels`` channels, 10
classes) and takes train_ddpm's step on random latents: its rows of the global batch through
DDP, the all-reduced loss, clipping, AdamW, EMA. Rank 0 times each step after a warm-up (the
all-reduce makes it wait for the slowest rank). Processes share the cores: OpenMP threads =
cores / processes unless ``OMP_NUM_THREADS`` is set. Prints a table and writes
``<out>/ddp_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from diffmodels.core.config import load_params
from diffmodels.core.device import select_device
from diffmodels.core.io import write_json
from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig
from diffmodels.training import distributed
from diffmodels.training.ema import EMA
from diffmodels.training.optim import backward_and_step, make_scheduler
from diffmodels.training.precision import Precision
from diffmodels.training.state import EpochSampler

NUM_CLASSES = 10


def worker(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    p = params.ddpm
    with distributed.initialized(select_device(p.device), params.distributed.backend) as world:
        world.check_batch(args.batch, "--batch")
        device, precision = world.device, Precision.from_mode(world.device, p.amp)
        torch.manual_seed(0)
        side, channels = params.data.resolution // 8, params.latents.channels
        model = UNet(UNetConfig.from_params(p, in_channels=channels, latent_size=side, num_classes=NUM_CLASSES)).to(device)
        forward, ema = world.wrap(model), EMA(model, p.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr)
        scheduler = make_scheduler(optimizer, 1, args.warmup + args.steps + 1)
        schedule = NoiseSchedule.from_kind(p.schedule, p.num_steps, p.beta_start, p.beta_end).to(device)
        data = torch.randn(4 * args.batch, channels, side, side)
        labels = torch.arange(len(data)) % NUM_CLASSES
        sampler, generator = EpochSampler(len(data), args.batch, 0), torch.Generator().manual_seed(0)

        def step() -> None:
            idx = sampler.next_batch()
            with precision.autocast():
                loss = diffusion_loss(forward, schedule, data[idx].to(device), labels[idx].to(device), generator,
                                      prediction=p.prediction, cond_dropout=p.cond_dropout,
                                      null_label=model.null_label, rows=world.rows(len(idx)))
            world.mean(loss.detach()).item()  # what the stage logs (and a sync point)
            backward_and_step(loss, model, optimizer, scheduler, p.grad_clip, precision.scaler)
            ema.update(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        if world.main:
            write_json(args.result, {
                "processes": world.size, "device": device.type, "threads_per_process": torch.get_num_threads(),
                "batch": args.batch, "per_process_batch": args.batch // world.size, "precision": precision.name,
                "s_per_step_median": round(statistics.median(times), 4), "s_per_step_min": round(min(times), 4),
                "latents_per_s": round(args.batch / statistics.median(times), 1),
            })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: ddpm.batch_size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.result is not None:
        return worker(args)
    batch = args.batch or load_params(args.params).ddpm.batch_size
    rows = []
    print(f"{'processes':>9}{'threads':>9}{'batch/proc':>12}{'s/step (median)':>17}{'s/step (min)':>14}{'latents/s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nproc:
            result = Path(tmp) / f"{n}.json"
            distributed.launch("benchmarks.ddp_step", ["--params", str(args.params), "--batch", str(batch),
                                                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                                                       "--result", str(result)], n)
            r = json.loads(result.read_text())
            rows.append(r)
            print(f"{n:>9}{r['threads_per_process']:>9}{r['per_process_batch']:>12}{r['s_per_step_median']:>17.3f}"
                  f"{r['s_per_step_min']:>14.3f}{r['latents_per_s']:>11.1f}")
    write_json(args.out / "ddp_step.json", {
        "cores": os.cpu_count(), "rows": rows,
        "timing": "rank 0 wall time of train_ddpm's step (rows of the global batch, DDP, clip, AdamW, EMA) after warm-up",
    })
    print(f"wrote {args.out / 'ddp_step.json'}")


if __name__ == "__main__":
    main()

"""Denoiser training throughput: latents per second and peak memory of one step (docs/design.md#performance).

    python3 -m benchmarks.train_step [--out reports/bench] [--batch 64] [--sizes 8 32] [--repeats 7]

For each mixer (serpentine, attention, none) and latent size it builds the UNet of the default
``ddpm`` params (context blocks at ``ddpm.mixer_downsample``, or at every level with
``--every-level``), and times one full training step: the DDPM
loss (:func:`diffmodels.diffusion.objectives.diffusion_loss`), backward, gradient clipping and an AdamW update.
On CUDA it also runs the step under bf16 autocast. The mixers' steps are timed in turns; the
ratio serpentine / attention is printed against its target (<= 1.0x). Prints a table and writes
``<out>/train_step.json``. Timing and memory as in :mod:`benchmarks.measure`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.measure import peak_mib, time_interleaved
from diffmodels.core.config import load_params
from diffmodels.core.io import write_json
from diffmodels.diffusion.objectives import diffusion_loss
from diffmodels.diffusion.schedule import NoiseSchedule
from diffmodels.models.unet import UNet, UNetConfig

MIXERS = ("serpentine", "attention", "none")
TARGET = 1.0  # step time, serpentine / attention


def context_levels(p, every_level: bool = False) -> tuple[int, ...]:
    """Downsample factors of the levels with context blocks: ``ddpm.mixer_downsample``, or all."""
    return tuple(2**i for i in range(len(p.channel_mult))) if every_level else tuple(p.mixer_downsample)


def build(p, mixer: str, size: int, channels: int, device: torch.device, every_level: bool = False) -> UNet:
    """The UNet of the ``ddpm`` params with ``mixer``; context blocks where ``ddpm.mixer_downsample``
    puts them, or at every level."""
    cfg = UNetConfig.from_params(p, in_channels=channels, latent_size=size, num_classes=10, mixer=mixer,
                                 mixer_downsample=context_levels(p, every_level), dropout=0.0)
    return UNet(cfg).to(device)


def step_fn(p, mixer: str, size: int, batch: int, device: torch.device, amp: torch.dtype | None,
            every_level: bool = False):
    """(model, one full training step) for a UNet with ``mixer``."""
    torch.manual_seed(0)
    model = build(p, mixer, size, 4, device, every_level)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.from_kind(p.schedule, p.num_steps, p.beta_start, p.beta_end).to(device)
    z0 = torch.randn(batch, 4, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = diffusion_loss(model, schedule, z0, labels, g, cond_dropout=0.1, null_label=model.null_label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step()  # warm-up (allocations, kernel selection)
    return model, step


def bench(p, size: int, batch: int, device: torch.device, amp: torch.dtype | None, repeats: int,
          every_level: bool = False) -> list[dict]:
    """One row per mixer; the three steps are timed in turns, so that load falls on all alike."""
    built = {mixer: step_fn(p, mixer, size, batch, device, amp, every_level) for mixer in MIXERS}
    timed = time_interleaved({mixer: step for mixer, (_, step) in built.items()}, repeats, device)
    rows = []
    for mixer, (model, step) in built.items():
        median, fastest = timed[mixer]
        rows.append({
            "mixer": mixer, "latent": size, "batch": batch, "precision": {None: "float32", torch.bfloat16: "bf16"}[amp],
            "device": str(device), "step_ms_median": round(median, 1), "step_ms_min": round(fastest, 1),
            "latents_per_s": round(batch / (median / 1e3), 1), "peak_mib": round(peak_mib(step, device), 1),
            "parameters": sum(q.numel() for q in model.parameters()),
            "context_levels": list(model.config.mixer_downsample),
        })
    ratio = rows[0]["step_ms_median"] / rows[1]["step_ms_median"]
    rows[0].update({"ratio_to_attention": round(ratio, 3), "target": TARGET, "pass": ratio <= TARGET})
    return rows


def unet_bench_args(description: str, *, batch_help: str, sizes: list[int], repeats: int):
    """(args, ddpm params, device) of a per-mixer UNet benchmark (this one and sample_step)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--batch", type=int, default=64, help=batch_help)
    parser.add_argument("--sizes", type=int, nargs="+", default=sizes)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--every-level", action="store_true", help="context blocks at every level, not ddpm.mixer_downsample's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, load_params(args.params).ddpm, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    args, p, device = unet_bench_args(__doc__.splitlines()[0], batch_help="latents per step (ddpm.batch_size is 64)",
                                      sizes=[8, 32], repeats=7)
    print(f"context blocks at downsample factors {list(context_levels(p, args.every_level))} and the middle")
    precisions = [None, torch.bfloat16] if device.type == "cuda" else [None]
    rows = []
    print(f"{'mixer':<11}{'latent':>7}{'prec':>9}{'ms (median)':>13}{'ms (min)':>10}"
          f"{'latents/s':>11}{'peak MiB':>10}{'params':>11}  serpentine / attention (target <= {TARGET}x)")
    for size in args.sizes:
        for amp in precisions:
            for r in bench(p, size, args.batch, device, amp, args.repeats, args.every_level):
                rows.append(r)
                verdict = (f"  {r['ratio_to_attention']:.2f}x {'PASS' if r['pass'] else 'FAIL'}"
                           if "ratio_to_attention" in r else "")
                print(f"{r['mixer']:<11}{size:>4}x{size:<2}{r['precision']:>9}{r['step_ms_median']:>13.1f}"
                      f"{r['step_ms_min']:>10.1f}{r['latents_per_s']:>11.1f}{r['peak_mib']:>10.1f}{r['parameters']:>11,}"
                      + verdict)
    write_json(args.out / "train_step.json", {
        "device": str(device), "threads": torch.get_num_threads(), "batch": args.batch, "rows": rows,
        "every_level": args.every_level,
        "timing": "median and min of repeats of one full step (loss, backward, clip, AdamW), mixers timed in turns",
        "memory": "peak tensor bytes above the step's start (CUDA allocator / CPU profiler records)",
    })
    print(f"wrote {args.out / 'train_step.json'}")


if __name__ == "__main__":
    main()

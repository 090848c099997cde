"""Denoiser sampling throughput: one classifier-free-guidance UNet call per mixer (docs/design.md#performance).

    python3 -m benchmarks.sample_step [--out reports/bench] [--batch 64] [--sizes 8 16] [--repeats 10]

A guided sampler evaluates the UNet on the conditional and the unconditional copy of every
latent in one batch of 2 x ``--batch`` (:func:`diffmodels.diffusion.samplers.classifier_free_guidance`),
without gradients. For each latent size it builds the UNet of the default ``ddpm`` params with
each mixer (serpentine, attention, none; context blocks at ``ddpm.mixer_downsample`` and the
middle, or at every level with ``--every-level``), times that call
in turns (:func:`benchmarks.measure.time_interleaved`) and prints the ratio serpentine /
attention against its target (<= 1.0x) with PASS / FAIL. Writes ``<out>/sample_step.json``.
"""

from __future__ import annotations

import functools

import torch

from benchmarks.measure import time_interleaved
from benchmarks.train_step import MIXERS, build, unet_bench_args
from diffmodels.core.io import write_json

TARGET = 1.0  # serpentine / attention


@torch.no_grad()
def guided_call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> None:
    model(x, t, labels)


def main() -> None:
    args, p, device = unet_bench_args(__doc__.splitlines()[0], sizes=[8, 16], repeats=10,
                                      batch_help="latents per sampling batch (the UNet sees twice as many)")
    print(f"device {device} ({torch.get_num_threads()} threads), guided batch 2 x {args.batch}, "
          f"median of {args.repeats} calls timed in turns")
    rows = []
    for size in args.sizes:
        x = torch.randn(2 * args.batch, 4, size, size, device=device)
        t = torch.randint(0, p.num_steps, (2 * args.batch,), device=device)
        labels = torch.cat([torch.randint(0, 10, (args.batch,)), torch.full((args.batch,), 10)]).to(device)
        models = {mixer: build(p, mixer, size, 4, device, args.every_level).eval() for mixer in MIXERS}

        calls = {mixer: functools.partial(guided_call, model, x, t, labels) for mixer, model in models.items()}
        for fn in calls.values():
            fn()  # warm-up
        timed = time_interleaved(calls, args.repeats, device)
        row = {"latent": size, "batch": 2 * args.batch, **{f"{m}_ms": round(timed[m][0], 2) for m in MIXERS},
               **{f"{m}_ms_min": round(timed[m][1], 2) for m in MIXERS},
               **{f"{m}_parameters": sum(q.numel() for q in models[m].parameters()) for m in MIXERS},
               "context_levels": list(models["serpentine"].config.mixer_downsample)}
        row["ratio"] = row["serpentine_ms"] / row["attention_ms"]
        row["pass"] = row["ratio"] <= TARGET
        rows.append(row)
    print("| latent | " + " | ".join(f"{m} ms" for m in MIXERS) + " | serpentine / attention | target | verdict |")
    print("|---" * (len(MIXERS) + 4) + "|")
    for r in rows:
        print(f"| {r['latent']}x{r['latent']} | " + " | ".join(f"{r[m + '_ms']:.1f}" for m in MIXERS)
              + f" | {r['ratio']:.2f}x | <= {TARGET}x | {'PASS' if r['pass'] else 'FAIL'} |")
    write_json(args.out / "sample_step.json", {
        "device": str(device), "threads": torch.get_num_threads(), "guided_batch": 2 * args.batch, "rows": rows,
        "timing": "median and min of calls timed in turns (one no-grad UNet forward each)", "target": TARGET,
    })
    print(f"wrote {args.out / 'sample_step.json'}")


if __name__ == "__main__":
    main()

"""SD v1 UNet: one denoising step of our implementation vs diffusers, same random weights (docs/design.md#performance).

    python -m benchmarks.sd_unet [--full] [--latent 64] [--batch 1] [--dtype float16] [--repeats 10]
                                 [--threads 1] [--out reports/bench]

Builds diffusers' ``UNet2DConditionModel`` for a config, perturbs every weight (so no branch is a
zero-initialised no-op), converts its state dict into our :class:`~diffmodels.sd.unet.SDUNet`
through the converter's diffusers table (the path of a diffusers folder), and times one
classifier-free-guidance step (a batch of 2 x ``--batch`` latents with 77-token contexts) of
each, same device and dtype, under ``torch.no_grad``. Reports the time ratio (ours / diffusers)
and the max abs difference of the outputs. Timing as in :mod:`benchmarks.measure`.

By default a reduced config (model channels 32, context 128, 16x16 latents) that runs in seconds
on a CPU; ``--full`` is v1-5 itself (859,520,964 parameters, 768-d context, 64x64 latents =
512 px), meant for a GPU. Prints a table and writes ``<out>/sd_unet.json``. Needs diffusers
(a test-only dependency).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.measure import time_ms
from diffmodels.core.device import select_device
from diffmodels.core.io import write_json
from diffmodels.sd.convert import apply_rows, unet_rows
from diffmodels.sd.unet import SDUNet, SDUNetConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REDUCED = SDUNetConfig(model_channels=32, context_dim=128)  # v1's layout (4 levels, attention at 0-2, 8 heads), narrower
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def diffusers_unet(c: SDUNetConfig):
    """diffusers' UNet2DConditionModel with the same architecture as our ``c``."""
    from diffusers import UNet2DConditionModel

    levels = range(len(c.channel_mult))
    return UNet2DConditionModel(
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(c.model_channels * m for m in c.channel_mult),
        layers_per_block=c.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)),
        cross_attention_dim=c.context_dim,
        attention_head_dim=c.num_heads,  # diffusers' legacy name: the number of heads in SD v1
        transformer_layers_per_block=c.transformer_depth,
        norm_num_groups=c.norm_groups,
    )


def build_pair(c: SDUNetConfig, seed: int = 0) -> tuple[SDUNet, torch.nn.Module]:
    """(ours, theirs) in eval mode on the CPU in float32, with identical random weights."""
    torch.manual_seed(seed)
    theirs = diffusers_unet(c)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = SDUNet(c)
    apply_rows(unet_rows(c, "", diffusers=True), theirs.state_dict(), ours, "diffusers UNet")
    return ours.eval(), theirs.eval()


def bench(c: SDUNetConfig, latent: int, batch: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    ours, theirs = build_pair(c)
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, c.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.full((2 * batch,), 500, dtype=torch.long).to(device)
    context = torch.randn(2 * batch, 77, c.context_dim, generator=g).to(device, dtype)

    with torch.no_grad():
        out_ours = ours(x, t, context)  # also the warm-up
        out_theirs = theirs(x, t, encoder_hidden_states=context).sample
        diff = (out_ours.float() - out_theirs.float()).abs().max().item()
        ms_ours = time_ms(lambda: ours(x, t, context), repeats, device)
        ms_theirs = time_ms(lambda: theirs(x, t, encoder_hidden_states=context), repeats, device)
    return {
        "params": sum(p.numel() for p in ours.parameters()), "latent": latent, "batch": 2 * batch,
        "dtype": str(dtype).removeprefix("torch."), "device": str(device),
        "ours_ms_median": round(ms_ours[0], 2), "ours_ms_min": round(ms_ours[1], 2),
        "diffusers_ms_median": round(ms_theirs[0], 2), "diffusers_ms_min": round(ms_theirs[1], 2),
        "ratio_median": round(ms_ours[0] / ms_theirs[0], 3), "max_abs_diff": diff,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the full v1-5 UNet (use a GPU)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 16 reduced, 64 full)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (the UNet sees twice as many, for guidance)")
    ap.add_argument("--dtype", choices=[*DTYPES, "auto"], default="auto", help="auto: float16 on CUDA, float32 elsewhere")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's); 1 avoids OpenMP contention on a shared CPU")
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = ap.parse_args(argv)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    config = SDUNetConfig.full() if args.full else REDUCED
    latent = args.latent or (64 if args.full else 16)
    row = bench(config, latent, args.batch, dtype, device, args.repeats)
    row.update(config="v1-5" if args.full else "reduced", threads=torch.get_num_threads() if device.type == "cpu" else None)
    print(f"SD UNet step, {row['config']} ({row['params']:,} parameters), batch {row['batch']} x 4 x {latent} x {latent}, "
          f"{row['dtype']} on {row['device']}")  # fmt: skip
    print(f"{'':>10} {'median ms':>10} {'min ms':>9}")
    print(f"{'ours':>10} {row['ours_ms_median']:>10.1f} {row['ours_ms_min']:>9.1f}")
    print(f"{'diffusers':>10} {row['diffusers_ms_median']:>10.1f} {row['diffusers_ms_min']:>9.1f}")
    print(f"time ratio ours / diffusers (median): {row['ratio_median']:.3f}; max abs difference {row['max_abs_diff']:.2e}")
    write_json(args.out / "sd_unet.json", row)
    return row


if __name__ == "__main__":
    main()

"""Serpentine block vs full self-attention, and the chunked scan vs the sequential loop (docs/design.md#performance).

    python -m benchmarks.serpentine [--out reports/bench] [--batch 2] [--width 64] [--max-grid 128]

For grids 8x8 .. 128x128 (sequence lengths 64 .. 16384) it times forward + backward of one
``SerpentineBlock`` and of one multi-head self-attention block of the same width (GroupNorm,
qkv projection, ``scaled_dot_product_attention``, output projection, residual), and measures the
peak memory of one such step. Then it runs the chunked SSD scan and the sequential reference loop
on the same inputs. It prints tables, the fitted growth exponents (slope of log time against
log sequence length) and the crossover grids, and writes ``<out>/serpentine.json`` and
``<out>/serpentine.png``.

Timing: CUDA events on a GPU; wall time (``time.perf_counter``) on CPU; the median of repeats,
fewer at large grids. Memory: on a GPU, ``torch.cuda.max_memory_allocated`` above the allocation
at the start of the step; on CPU, the same quantity rebuilt from the allocation records of
torch's profiler (``profile_memory=True``): the running total of bytes held by tensors, its peak
above the start. Both count tensors only (activations kept for backward, gradients, workspace),
not allocator caches or the process's other memory.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from benchmarks.measure import peak_mib, time_ms  # noqa: E402
from diffmodels.core.io import write_json  # noqa: E402
from diffmodels.models.serpentine import SerpentineBlock  # noqa: E402
from diffmodels.models.ssm import selective_scan_reference, ssd_chunked_scan  # noqa: E402

GRIDS = (8, 16, 32, 64, 128)
# The unfused attention stores B * heads * L^2 floats several times over: at 128x128 (B=2, 2 heads)
# about 13 GB, more than this benchmark should ask of a shared CPU machine.
MATH_ATTENTION_MAX_GRID = 64
BLOCKS = ("serpentine", "attention", "attention_unfused")


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all H*W positions: the quadratic baseline.

    ``fused=True`` lets SDPA pick its fused (flash) kernel, which never stores the L x L weights;
    ``fused=False`` forces the math kernel, which does, as a plain attention implementation would.
    """

    def __init__(self, channels: int, heads: int, norm_groups: int = 32, fused: bool = True) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(t).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(SDPBackend.MATH) if not self.fused else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, L, hs)
        y = self.out_proj(y.transpose(1, 2).reshape(b, h * w, c))  # (B, L, C)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


def step_fn(block: nn.Module, x: Tensor) -> Callable[[], None]:
    """One training-like step: forward, backward with a fixed random output gradient, drop grads."""
    grad = torch.randn_like(x)

    def step() -> None:
        block(x).backward(grad)
        block.zero_grad(set_to_none=True)
        x.grad = None

    return step


def repeats_for(grid: int) -> int:
    # fewer repeats where one step takes seconds, so the run fits in a few minutes on 2 CPU cores
    return {8: 10, 16: 10, 32: 5, 64: 3}.get(grid, 1)


def bench_blocks(args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    blocks = {
        "serpentine": SerpentineBlock(args.width, directions=args.directions).to(device),
        "attention": AttentionBlock(args.width, heads=args.width // 32).to(device),
        "attention_unfused": AttentionBlock(args.width, heads=args.width // 32, fused=False).to(device),
    }
    rows = []
    for grid in (g for g in GRIDS if g <= args.max_grid):
        x = torch.randn(args.batch, args.width, grid, grid, device=device, requires_grad=True)
        row = {"grid": f"{grid}x{grid}", "L": grid * grid}
        for name, block in blocks.items():
            if name == "attention_unfused" and grid > MATH_ATTENTION_MAX_GRID:
                continue
            step = step_fn(block, x)
            row[f"{name}_peak_mib"] = peak_mib(step, device)  # doubles as the warm-up
            row[f"{name}_ms"], row[f"{name}_ms_min"] = time_ms(step, repeats_for(grid), device)
        rows.append(row)
        print(f"  {row['grid']:>7}  L={row['L']:>5}  serpentine {row['serpentine_ms']:9.1f} ms"
              f" (min {row['serpentine_ms_min']:9.1f}) {row['serpentine_peak_mib']:8.1f} MiB   attention"
              f" {row['attention_ms']:9.1f} ms (min {row['attention_ms_min']:9.1f})"
              f" {row['attention_peak_mib']:8.1f} MiB", flush=True)
        if "attention_unfused_ms" in row:
            print(f"  {'':>7}  {'':>7}  unfused attention {row['attention_unfused_ms']:9.1f} ms"
                  f" (min {row['attention_unfused_ms_min']:9.1f}) {row['attention_unfused_peak_mib']:8.1f} MiB")
    return rows


def bench_scan(device: torch.device, lengths=(256, 1024, 4096, 16384)) -> list[dict]:
    """Chunked SSD scan vs the sequential loop: float32, forward only, layer-sized heads, min time."""
    g = torch.Generator().manual_seed(0)
    b, h, p, n = 2, 4, 32, 32
    rows = []
    for l in lengths:
        x = torch.randn(b, l, h, p, generator=g)
        dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=g) - 3)
        A = -torch.rand(h, generator=g) * 15 - 1
        B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
        inputs = [t.to(device) for t in (x, dt, A, B, C)]
        with torch.no_grad():
            y_chunk, _ = ssd_chunked_scan(*inputs, chunk_size=64)
            y_loop, _ = selective_scan_reference(*inputs)
            reps = 3 if l <= 4096 else 1
            row = {
                "L": l,
                "chunked_ms": time_ms(partial(ssd_chunked_scan, *inputs, chunk_size=64), reps, device)[1],
                "loop_ms": time_ms(partial(selective_scan_reference, *inputs), reps, device)[1],
                "max_abs_diff": (y_chunk - y_loop).abs().max().item(),
                "max_abs_output": y_loop.abs().max().item(),
            }
        rows.append(row)
        print(f"  L={l:>5}  chunked {row['chunked_ms']:8.1f} ms  loop {row['loop_ms']:8.1f} ms"
              f"  speed-up {row['loop_ms'] / row['chunked_ms']:6.1f}x  max|diff| {row['max_abs_diff']:.2e}"
              f" (max|y| {row['max_abs_output']:.1f})", flush=True)
    return rows


def growth_exponent(lengths: list[int], values: list[float]) -> float:
    """Slope of log(value) against log(L): ~1 for linear cost, ~2 for quadratic."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def crossover(rows: list[dict], key: str, baseline: str = "attention") -> str | None:
    """First grid from which the serpentine block stays cheaper than ``baseline`` on ``key``."""
    rows = [r for r in rows if f"{baseline}_{key}" in r]
    for i, row in enumerate(rows):
        if all(r[f"serpentine_{key}"] < r[f"{baseline}_{key}"] for r in rows[i:]):
            return row["grid"]
    return None


def summarise(rows: list[dict], scan_rows: list[dict]) -> dict:
    big = slice(-3, None)  # the asymptotic regime: fixed overheads dominate the small grids
    exps = {}
    for name in BLOCKS:
        measured = [r for r in rows if f"{name}_ms" in r]
        L = [r["L"] for r in measured]
        for key in ("ms", "ms_min", "peak_mib"):
            v = [r[f"{name}_{key}"] for r in measured]
            exps[f"{name}_{key}"] = {"all": growth_exponent(L, v), "largest_3": growth_exponent(L[big], v[big])}
    for key in ("chunked_ms", "loop_ms"):
        exps[f"scan_{key}"] = {"all": growth_exponent([r["L"] for r in scan_rows], [r[key] for r in scan_rows])}
    keys = ("ms", "ms_min", "peak_mib")
    cross = {f"{base}_{key}": crossover(rows, key, base) for base in BLOCKS[1:] for key in keys}
    return {"exponents": exps, "crossover": cross}


def plot(rows: list[dict], scan_rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in ((axes[0], "ms_min", "forward+backward time, min of repeats (ms)"),
                           (axes[1], "peak_mib", "peak memory (MiB)")):
        for name in BLOCKS:
            measured = [r for r in rows if f"{name}_{key}" in r]
            ax.plot([r["L"] for r in measured], [r[f"{name}_{key}"] for r in measured], "o-", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L = H*W", ylabel=label)
    sl = [r["L"] for r in scan_rows]
    axes[2].plot(sl, [r["chunked_ms"] for r in scan_rows], "o-", label="chunked SSD scan")
    axes[2].plot(sl, [r["loop_ms"] for r in scan_rows], "o-", label="sequential loop")
    axes[2].set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0].set_title("Serpentine block vs self-attention")
    axes[2].set_title("Selective scan")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--directions", type=int, default=2)
    ap.add_argument("--max-grid", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    memory_method = ("torch.cuda.max_memory_allocated above the start of the step" if device.type == "cuda"
                     else "peak of the CPU allocator's running total of tensor bytes, replayed from "
                          "torch.profiler allocation records (profile_memory=True), above the start of the step")
    print(f"device {device} ({torch.get_num_threads()} threads), batch {args.batch}, width {args.width}, "
          f"serpentine directions {args.directions}, attention heads {args.width // 32}")
    print(f"time: {'CUDA events' if device.type == 'cuda' else 'time.perf_counter'}, median and min of repeats; "
          f"memory: {memory_method}")
    print("blocks, forward+backward:")
    rows = bench_blocks(args, device)
    print("selective scan, float32 forward (b=2, heads=4, P=32, N=32, chunk 64):")
    scan_rows = bench_scan(device)
    summary = summarise(rows, scan_rows)

    print("\nforward+backward time in ms (median / min of repeats) and peak memory in MiB; "
          "attention = fused SDPA, unfused = SDPA math kernel (stores the L x L weights)")
    print("| grid | L | " + " | ".join(f"{n} ms | {n} MiB" for n in BLOCKS) + " |")
    print("|---" * (2 + 2 * len(BLOCKS)) + "|")
    for r in rows:
        cells = [f"{r[n + '_ms']:.1f} / {r[n + '_ms_min']:.1f} | {r[n + '_peak_mib']:.1f}" if n + "_ms" in r
                 else "not run | not run" for n in BLOCKS]
        print(f"| {r['grid']} | {r['L']} | " + " | ".join(cells) + " |")
    print("\ngrowth exponents (slope of log cost vs log L; all points / 3 largest grids):")
    for name, e in summary["exponents"].items():
        print(f"  {name:28s} " + " / ".join(f"{v:.2f}" for v in e.values()))
    print("serpentine cheaper from grid (None = not within the grids measured):")
    for name, grid in summary["crossover"].items():
        print(f"  vs {name:28s} {grid}")

    result = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "batch": args.batch, "width": args.width, "directions": args.directions,
        "attention_heads": args.width // 32, "memory_method": memory_method,
        "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter") + ", median and min of repeats",
        "blocks": rows, "scan": scan_rows, **summary,
    }
    write_json(args.out / "serpentine.json", result)
    plot(rows, scan_rows, args.out / "serpentine.png")
    print(f"wrote {args.out / 'serpentine.json'} and {args.out / 'serpentine.png'}")


if __name__ == "__main__":
    main()

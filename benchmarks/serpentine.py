"""Serpentine block vs self-attention, and the chunked scan vs the sequential loop (docs/design.md#performance).

    python3 -m benchmarks.serpentine [--out reports/bench] [--batches 2 32] [--width 64] [--max-grid 64]

For grids 8x8 .. 64x64 (sequence lengths 64 .. 4096; ``--max-grid 128`` adds 16384) and each
batch it times forward + backward of one ``SerpentineBlock`` (the defaults of ``ddpm``: expand 1,
heads of 64, state 16, a path and its reverse) against three attention blocks of the same width:

    sdpa        GroupNorm, qkv projection, fused ``scaled_dot_product_attention``, output
                projection, residual (the project's own attention mixer)
    diffusers   diffusers' ``Attention`` as Stable Diffusion's mid block builds it (GroupNorm,
                residual, upcast softmax); diffusers is a test-only dependency, skipped if absent
    unfused     the sdpa block forced onto SDPA's math kernel, which stores the L x L weights

It also times ``shell``: the serpentine block with its SSM taken out (norm, in-projection,
depthwise conv, the path gathers, output norm, gate, out-projection, residual), the floor that no sequence layer
inside this block design can go below; where the shell alone is slower than attention, a time
target there cannot be met by a faster scan.

It measures the peak memory of one such step, prints the ratios serpentine / attention with the
targets they are held to (time <= 1.0x at 8x8 .. 32x32 and <= 0.5x at 64x64 against sdpa and
diffusers; peak memory <= 1.0x sdpa from 32x32 up) and PASS / FAIL, then runs the chunked SSD
scan and the sequential reference loop on the same inputs. Writes ``<out>/serpentine.json``
and ``<out>/serpentine.png``. The larger batch stops at ``--max-grid-large`` (32) by default.

Timing: CUDA events on a GPU; wall time (``time.perf_counter``) on CPU; the blocks of one grid
are timed in turns (:func:`benchmarks.measure.time_interleaved`), so that other load on the
machine falls on all of them alike; ratios use the medians. Memory: on a GPU,
``torch.cuda.max_memory_allocated`` above the allocation at the start of the step; on CPU, the
same quantity rebuilt from the allocation records of torch's profiler (``profile_memory=True``):
the running total of bytes held by tensors, its peak above the start. Both count tensors only
(activations kept for backward, gradients, workspace), not allocator caches.
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

from benchmarks.measure import peak_mib, time_interleaved, time_ms  # noqa: E402
from diffmodels.core.io import write_json  # noqa: E402
from diffmodels.models.serpentine import SerpentineBlock  # noqa: E402
from diffmodels.models.ssm import selective_scan_reference, ssd_chunked_scan  # noqa: E402

GRIDS = (8, 16, 32, 64, 128)
# The unfused attention stores B * heads * L^2 floats several times over: at 128x128 (B=2, 2 heads)
# about 13 GB, more than this benchmark should ask of a shared CPU machine.
MATH_ATTENTION_MAX_ELEMENTS = 2 * 64**4
BASELINES = ("sdpa", "diffusers", "unfused")
# serpentine / attention, held against sdpa and diffusers (the acceptance targets)
TIME_TARGET = {8: 1.0, 16: 1.0, 32: 1.0, 64: 0.5, 128: 0.5}
MEMORY_TARGET = {32: 1.0, 64: 1.0, 128: 1.0}  # against sdpa


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


class _NoSSM(nn.Module):
    """Stands in for a block's ``SelectiveSSM``: the sequences pass through unchanged."""

    def forward(self, x: Tensor, z: Tensor | None = None, **_: object) -> Tensor:
        return x


def shell_block(width: int, directions: int) -> SerpentineBlock:
    """The serpentine block with its SSM taken out (the path gathers stay): what the block costs
    around the sequence layer."""
    block = SerpentineBlock(width, directions=directions)
    block.ssm = _NoSSM()
    return block


def diffusers_attention(channels: int, head_dim: int = 32, norm_groups: int = 32) -> nn.Module | None:
    """diffusers' spatial self-attention as ``UNetMidBlock2D`` builds it, or None without diffusers."""
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:
        return None
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, norm_num_groups=norm_groups,
                     residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)


def step_fn(block: nn.Module, x: Tensor) -> Callable[[], None]:
    """One training-like step: forward, backward with a fixed random output gradient, drop grads."""
    grad = torch.randn_like(x)

    def step() -> None:
        block(x).backward(grad)
        block.zero_grad(set_to_none=True)
        x.grad = None

    return step


def repeats_for(grid: int, batch: int) -> int:
    # fewer repeats where one step takes seconds, so the run fits in a few minutes on 2 CPU cores
    work = grid * grid * batch
    return 15 if work <= 16 * 16 * 32 else 7 if work <= 32 * 32 * 32 else 3 if work <= 64 * 64 * 2 else 1


def blocks_for(width: int, directions: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    blocks = {
        "serpentine": SerpentineBlock(width, directions=directions),
        "shell": shell_block(width, directions),
        "sdpa": AttentionBlock(width, heads=width // 32),
        "diffusers": diffusers_attention(width),
        "unfused": AttentionBlock(width, heads=width // 32, fused=False),
    }
    return {name: block.to(device) for name, block in blocks.items() if block is not None}


def bench_blocks(args: argparse.Namespace, batch: int, device: torch.device) -> list[dict]:
    blocks = blocks_for(args.width, args.directions, device)
    max_grid = args.max_grid if batch <= 2 else min(args.max_grid, args.max_grid_large)
    rows = []
    for grid in (g for g in GRIDS if g <= max_grid):
        x = torch.randn(batch, args.width, grid, grid, device=device, requires_grad=True)
        row = {"batch": batch, "grid": grid, "L": grid * grid}
        steps = {name: step_fn(block, x) for name, block in blocks.items()
                 if name != "unfused" or batch * grid**4 <= MATH_ATTENTION_MAX_ELEMENTS}
        for name, step in steps.items():
            row[f"{name}_peak_mib"] = peak_mib(step, device)  # doubles as the warm-up
        for name, (median, fastest) in time_interleaved(steps, repeats_for(grid, batch), device).items():
            row[f"{name}_ms"], row[f"{name}_ms_min"] = median, fastest
        add_verdicts(row)
        rows.append(row)
        print(f"  batch {batch:>2}  {grid:>3}x{grid:<3} " + "  ".join(
            f"{name} {row[name + '_ms']:.1f} ms {row[name + '_peak_mib']:.1f} MiB" for name in steps), flush=True)
    return rows


def add_verdicts(row: dict) -> None:
    """Ratios serpentine / baseline and, where a target applies, whether it is met."""
    for base in BASELINES:
        if f"{base}_ms" in row:
            row[f"time_ratio_{base}"] = row["serpentine_ms"] / row[f"{base}_ms"]
            row[f"memory_ratio_{base}"] = row["serpentine_peak_mib"] / row[f"{base}_peak_mib"]
    grid = row["grid"]
    checks = {}
    if grid in TIME_TARGET:
        for base in ("sdpa", "diffusers"):
            if f"time_ratio_{base}" in row:
                checks[f"time_vs_{base}"] = row[f"time_ratio_{base}"] <= TIME_TARGET[grid]
    if grid in MEMORY_TARGET:
        checks["memory_vs_sdpa"] = row["memory_ratio_sdpa"] <= MEMORY_TARGET[grid]
    row["checks"] = checks


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


def summarise(rows: list[dict], scan_rows: list[dict]) -> dict:
    """Growth exponents per batch and block, and every target check with its verdict."""
    exps = {}
    for batch in sorted({r["batch"] for r in rows}):
        for name in ("serpentine", *BASELINES):
            measured = [r for r in rows if r["batch"] == batch and f"{name}_ms" in r]
            if len(measured) >= 2:
                L = [r["L"] for r in measured]
                exps[f"batch{batch}_{name}"] = {key: growth_exponent(L, [r[f"{name}_{key}"] for r in measured])
                                                for key in ("ms", "peak_mib")}
    exps["scan_chunked_ms"] = growth_exponent([r["L"] for r in scan_rows], [r["chunked_ms"] for r in scan_rows])
    exps["scan_loop_ms"] = growth_exponent([r["L"] for r in scan_rows], [r["loop_ms"] for r in scan_rows])
    checks = [{"batch": r["batch"], "grid": r["grid"], "check": name, "pass": ok}
              for r in rows for name, ok in r["checks"].items()]
    return {"exponents": exps, "checks": checks, "all_pass": all(c["pass"] for c in checks)}


def print_tables(rows: list[dict]) -> None:
    print("\nforward + backward, median of repeats in ms (ratio serpentine / baseline); peak MiB")
    names = [n for n in ("serpentine", *BASELINES) if any(f"{n}_ms" in r for r in rows)]
    print("| batch | grid | " + " | ".join(f"{n} ms" for n in names) + " | time target | verdict | "
          + " | ".join(f"{n} MiB" for n in names) + " | memory target | verdict |")
    print("|---" * (6 + 2 * len(names)) + "|")
    def cell(r: dict, name: str, quantity: str) -> str:
        unit = {"time": "_ms", "memory": "_peak_mib"}[quantity]
        if name + unit not in r:
            return "-"
        ratio = "" if name == "serpentine" else f" ({r[f'{quantity}_ratio_{name}']:.2f}x)"
        return f"{r[name + unit]:.1f}{ratio}"

    for r in rows:
        c = r["checks"]
        time_checks = [v for k, v in c.items() if k.startswith("time")]
        verdict_t = ("PASS" if all(time_checks) else "FAIL") if time_checks else "-"
        verdict_m = ("PASS" if c["memory_vs_sdpa"] else "FAIL") if "memory_vs_sdpa" in c else "-"
        target_t = f"<= {TIME_TARGET[r['grid']]}x" if r["grid"] in TIME_TARGET else "-"
        target_m = f"<= {MEMORY_TARGET[r['grid']]}x sdpa" if r["grid"] in MEMORY_TARGET else "-"
        print(f"| {r['batch']} | {r['grid']}x{r['grid']} | " + " | ".join(cell(r, n, "time") for n in names)
              + f" | {target_t} | {verdict_t} | " + " | ".join(cell(r, n, "memory") for n in names)
              + f" | {target_m} | {verdict_m} |")


def print_shell_table(rows: list[dict]) -> None:
    print("\nthe block around the scan: shell (serpentine without its SSM) / sdpa, and the scan's share")
    print("| batch | grid | shell ms | shell / sdpa | serpentine - shell ms | scan share of serpentine |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "shell_ms" in r and "sdpa_ms" in r:
            scan = r["serpentine_ms"] - r["shell_ms"]
            print(f"| {r['batch']} | {r['grid']}x{r['grid']} | {r['shell_ms']:.1f} | {r['shell_ms'] / r['sdpa_ms']:.2f}x"
                  f" | {scan:.1f} | {scan / r['serpentine_ms']:.0%} |")


def plot(rows: list[dict], scan_rows: list[dict], path: Path) -> None:
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in ((axes[0], "ms", "forward+backward time, median (ms)"),
                           (axes[1], "peak_mib", "peak memory (MiB)")):
        for batch, style in zip(batches, ("o-", "s--", "^:")):
            for name, colour in zip(("serpentine", *BASELINES), ("C0", "C1", "C2", "C3")):
                measured = [r for r in rows if r["batch"] == batch and f"{name}_{key}" in r]
                if measured:
                    ax.plot([r["L"] for r in measured], [r[f"{name}_{key}"] for r in measured], style,
                            color=colour, label=f"{name}, batch {batch}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length L = H*W", ylabel=label)
    sl = [r["L"] for r in scan_rows]
    axes[2].plot(sl, [r["chunked_ms"] for r in scan_rows], "o-", label="chunked SSD scan")
    axes[2].plot(sl, [r["loop_ms"] for r in scan_rows], "o-", label="sequential loop")
    axes[2].set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("Serpentine block vs self-attention")
    axes[2].set_title("Selective scan")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("reports/bench"))
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--directions", type=int, default=2)
    ap.add_argument("--max-grid", type=int, default=64)
    ap.add_argument("--max-grid-large", type=int, default=32, help="largest grid for batches above 2")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory_method = ("torch.cuda.max_memory_allocated above the start of the step" if device.type == "cuda"
                     else "peak of the CPU allocator's running total of tensor bytes, replayed from "
                          "torch.profiler allocation records (profile_memory=True), above the start of the step")
    timing = ("CUDA events" if device.type == "cuda" else "time.perf_counter") + ", blocks timed in turns, median of repeats"
    print(f"device {device} ({torch.get_num_threads()} threads), batches {args.batches}, width {args.width}, "
          f"serpentine directions {args.directions}, attention heads {args.width // 32}")
    print(f"time: {timing}; memory: {memory_method}")
    print("blocks, forward+backward:")
    rows = [row for batch in args.batches for row in bench_blocks(args, batch, device)]
    print("selective scan, float32 forward (b=2, heads=4, P=32, N=32, chunk 64):")
    scan_rows = bench_scan(device)
    summary = summarise(rows, scan_rows)
    print_tables(rows)
    print_shell_table(rows)
    print("\ngrowth exponents of time / memory (slope of log cost vs log L):")
    for name, e in summary["exponents"].items():
        print(f"  {name:28s} " + (" / ".join(f"{v:.2f}" for v in e.values()) if isinstance(e, dict) else f"{e:.2f}"))
    failed = [c for c in summary["checks"] if not c["pass"]]
    print(f"targets: {len(summary['checks']) - len(failed)} of {len(summary['checks'])} met"
          + "".join(f"\n  FAIL batch {c['batch']} {c['grid']}x{c['grid']} {c['check']}" for c in failed))

    result = {
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "batches": args.batches, "width": args.width, "directions": args.directions,
        "attention_heads": args.width // 32, "memory_method": memory_method, "timing": timing,
        "time_target": TIME_TARGET, "memory_target": MEMORY_TARGET,
        "blocks": rows, "scan": scan_rows, **summary,
    }
    write_json(args.out / "serpentine.json", result)
    plot(rows, scan_rows, args.out / "serpentine.png")
    print(f"wrote {args.out / 'serpentine.json'} and {args.out / 'serpentine.png'}")


if __name__ == "__main__":
    main()

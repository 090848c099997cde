"""Measurement helpers shared by the benchmarks: wall/CUDA-event time and peak tensor memory.

Memory on a GPU is ``torch.cuda.max_memory_allocated`` above the allocation at the start; on
CPU the same quantity is rebuilt from the allocation records of torch's profiler
(``profile_memory=True``). Both count tensors only, not allocator caches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in ms (CUDA events on a GPU). The caller warmed it up.

    The minimum is reported beside the median because other jobs may share the CPU: contention
    only ever adds time, so the fastest repeat is the best estimate of the cost itself.
    """
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), min(times)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """(median, min) ms of each of ``fns``, timed in turns (a, b, c, a, b, c, ...) so that load from
    other jobs falls on all of them alike and their ratios stay meaningful. The caller warmed them up."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, 1, device)[0])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes held by tensors while ``fn`` runs, above what was held when it started, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - start) / MIB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each allocation record carries the allocator's running total after it; replay them in order.
    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == torch._C._profiler._EventType.Allocation and node.extra_fields.device.type == "cpu":
            records.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    if not records:
        raise RuntimeError("the profiler recorded no CPU allocations; cannot measure memory")
    records.sort()
    start = records[0][2] - records[0][1]
    return (max(total for _, _, total in records) - start) / MIB

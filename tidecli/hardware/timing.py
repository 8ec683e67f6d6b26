"""Timing helpers for the microbenchmarks: the median of repeats after a warm-up, by CUDA events
on the GPU or by the wall clock on the CPU. torch is imported inside the functions."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

TOKENS = (1, 2, 4, 8, 16, 32)  # tokens per expert call the profile measures


def median_cuda_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    """Median over `repeats` of fn's GPU time between two events on the current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, repeats)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_graph_ms(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    """Median GPU time of fn captured once as a CUDA graph and replayed, as the runtime's
    captured step runs it: no host launch gaps between fn's kernels. Raises where fn cannot be
    captured (a host sync inside it); callers fall back to `median_cuda_ms`."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: kernels chosen, workspaces made
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_cuda_ms(graph.replay, warmup=1, repeats=repeats)


def median_wall_ms(fn: Callable[[], Any], *, warmup: int, repeats: int,
                   budget_s: float | None = None) -> float:
    """Median wall time; past `budget_s` no further repeats (a setup that slow loses anyway)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)

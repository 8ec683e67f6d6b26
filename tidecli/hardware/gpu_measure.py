"""GPU microbenchmarks behind a measured `HardwareProfile`: host↔GPU copies (pinned and
pageable), copy latency, device memory bandwidth, a bf16 GEMM, and one MoE layer's experts on
the GPU (bf16 through the grouped kernel, a compressed format through its dequantizing kernel).
Each is timed for real: warm-up, then the median of repeats (CUDA events; the tests time them
on CPU tensors by wall clock). torch is imported inside the functions, so importing this module
stays cheap; measure.py assembles the profile from these and cpu_measure.py's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidecli.hardware.timing import TOKENS, median_cuda_ms, median_graph_ms


def expert_bytes(hidden: int, inter: int, dtype_bytes: int = 2) -> int:
    """gate + up + down of one routed expert."""
    return 3 * hidden * inter * dtype_bytes


# ---------------------------------------------------------------- GPU


def h2d_gbps(nbytes: int, *, pinned: bool, device: Any, warmup: int = 3,
             repeats: int = 10) -> float:
    """Host → preallocated device buffer, as the runtime promotes an expert into a slot."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)  # commit the pages now: page faults are not part of a transfer
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = median_cuda_ms(lambda: dst.copy_(src, non_blocking=True), warmup=warmup, repeats=repeats)
    return nbytes / ms / 1e6


def d2h_gbps(nbytes: int, *, device: Any, warmup: int = 3, repeats: int = 10) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    ms = median_cuda_ms(lambda: dst.copy_(src, non_blocking=True), warmup=warmup, repeats=repeats)
    return nbytes / ms / 1e6


def copy_latency_ms(*, device: Any, nbytes: int = 4096, warmup: int = 5,
                    repeats: int = 50) -> float:
    """Fixed cost of one small pinned async copy (issue + DMA set-up)."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return median_cuda_ms(lambda: dst.copy_(src, non_blocking=True), warmup=warmup,
                          repeats=repeats)


def d2d_gbps(nbytes: int, *, device: Any, warmup: int = 3, repeats: int = 10) -> float:
    """Device memory bandwidth from a large device copy, read and write both counted."""
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_cuda_ms(lambda: dst.copy_(src), warmup=warmup, repeats=repeats)
    return 2 * nbytes / ms / 1e6


def gemm_tflops(n: int, *, device: Any, warmup: int = 3, repeats: int = 10) -> float:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device, generator=gen)
    c = torch.empty_like(a)
    ms = median_cuda_ms(lambda: torch.mm(a, b, out=c), warmup=warmup, repeats=repeats)
    return 2 * n**3 / ms / 1e9


def _layer_call(kernel: str, x: Any, pair_slot: Any, gate_up: Any, down: Any,
                k: int) -> Callable[[], Any]:
    """One layer's expert compute with the runtime's kernel, as a no-argument call."""
    import torch

    from tidecli.experts.compute import run_grouped_loop, run_grouped_mm

    if kernel == "grouped_mm":
        return lambda: run_grouped_mm(x, pair_slot, gate_up, down, k)
    out = torch.empty(pair_slot.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    slots = pair_slot.tolist()  # the loop groups on the host: do it once, not per call
    return lambda: run_grouped_loop(x, slots, gate_up, down, k, out)


def gpu_expert_ms(hidden: int, inter: int, *, device: Any, tokens: tuple[int, ...] = TOKENS,
                  pool_experts: int = 64, top_k: int = 8, warmup: int = 3, repeats: int = 10,
                  on_tokens: Callable[[int], None] | None = None,
                  fmt: str = "bf16", captured: bool = True) -> tuple[dict[int, float], str, bool]:
    """One MoE layer on the GPU: T tokens routed top-k over `pool_experts` resident experts,
    stored in `fmt` (bf16, or a compressed format of experts/formats.py, computed by its
    dequantizing kernel).

    Returns (tokens → ms per distinct expert used, kernel name, whether it was timed
    captured). Uses the runtime's own grouped kernel where it exists, else its per-expert loop.
    `captured`: on a GPU the call is timed as a CUDA graph's replay, as the runtime's captured
    step runs it; timed uncaptured, the host's launch gaps between its small kernels count as
    expert time. A call that cannot be captured is timed uncaptured (and says so).
    """
    import torch

    from tidecli.experts.compute import grouped_mm_available, pool_views
    from tidecli.experts.formats import expert_format

    device = torch.device(device)
    # own generators: a profile taken inside `tide generate` must not move the user's seeds
    gen_dev = torch.Generator(device=device).manual_seed(0)
    gen_cpu = torch.Generator().manual_seed(0)
    buf = torch.empty(pool_experts, 3 * hidden * inter, dtype=torch.bfloat16, device=device)
    buf.normal_(0.0, 0.02, generator=gen_dev)
    layout = expert_format(fmt, hidden=hidden, inter=inter)
    if layout.compressed:
        from tidecli.experts.qkernel import qkernel_available
        from tidecli.experts.quant import quantize_rows

        # a few experts at a time: quantizing works in fp32, several times bf16's bytes
        buf = torch.cat([quantize_rows(buf[i: i + 8], layout)
                         for i in range(0, buf.shape[0], 8)])
        kernel = "grouped_mm" if qkernel_available(device, torch.bfloat16, fmt) else "loop"
    else:
        kernel = "grouped_mm" if grouped_mm_available(device, torch.bfloat16) else "loop"
    gate_up, down = pool_views(buf, hidden, inter, layout)
    k = min(top_k, pool_experts)
    result: dict[int, float] = {}
    for t in tokens:
        if on_tokens is not None:
            on_tokens(t)
        x = torch.randn(t, hidden, generator=gen_cpu).to(device, torch.bfloat16)
        ids = torch.rand(t, pool_experts, generator=gen_cpu).argsort(dim=1)[:, :k]  # distinct
        distinct = int(ids.unique().numel())
        pair_slot = ids.reshape(-1).to(device)
        if kernel == "grouped_mm":
            try:
                _layer_call("grouped_mm", x, pair_slot, gate_up, down, k)()
            except RuntimeError:  # a card or torch build without the kernel: use the loop
                kernel = "loop"
        fn = _layer_call(kernel, x, pair_slot, gate_up, down, k)
        ms = None
        if captured and device.type == "cuda":
            try:
                ms = median_graph_ms(fn, warmup=warmup, repeats=repeats)
            except RuntimeError:
                captured = False  # and the rest of the sizes alike: one way per profile
        if ms is None:
            ms = median_cuda_ms(fn, warmup=warmup, repeats=repeats)
        result[t] = ms / distinct
    return result, kernel, captured and device.type == "cuda"

"""CPU side of `tide profile`: host memory reads and routed-expert calls over tokens × threads ×
dtype × threading mode, timed for real (warm-up, then the median of repeats). torch is imported
inside the functions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidecli.hardware.timing import TOKENS, median_wall_ms

CPU_PICK_TOKENS = 8  # a skipped step sends a handful of tokens to each missed expert
CPU_VARIANTS = (("bf16", "intra"), ("bf16", "experts"), ("fp32", "intra"), ("fp32", "experts"))


def thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... below `cores`, then `cores` itself."""
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return [*out, max(1, cores)]


def ram_read_gbps(nbytes: int, *, warmup: int = 1, repeats: int = 3) -> float:
    """Host memory read bandwidth: a multi-threaded sum over a buffer far larger than caches."""
    import torch

    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32)
    ms = median_wall_ms(lambda: x.sum(), warmup=warmup, repeats=repeats)
    return x.numel() * 4 / ms / 1e6


def host_expert_rows(n: int, hidden: int, inter: int) -> Any:
    """n packed bf16 expert rows [n, 3·I·H], each its own memory so every call reads RAM."""
    import torch

    gen = torch.Generator().manual_seed(0)
    row = torch.empty(3 * hidden * inter).uniform_(-0.03, 0.03, generator=gen).bfloat16()
    return row.repeat(n, 1)  # one random row copied: far cheaper than n random draws


def cpu_expert_call_ms(rows: Any, *, hidden: int, inter: int, tokens: int, threads: int,
                       dtype: str, mode: str, warmup: int = 1, repeats: int = 3,
                       budget_s: float | None = None) -> float:
    """ms per expert call, amortised over a batch of one call per row, as `CpuExperts` runs
    a layer's misses (dtype "bf16" | "fp32", mode "intra" | "experts")."""
    import torch

    from tidecli.experts.cpu import CpuExperts

    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(tokens)
    jobs = [(rows[j], torch.randn(tokens, hidden, generator=gen).bfloat16())
            for j in range(rows.shape[0])]
    worker = CpuExperts(hidden=hidden, inter=inter, dtype=compute, threads=threads, mode=mode)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ms = median_wall_ms(lambda: worker.run(jobs), warmup=warmup, repeats=repeats,
                            budget_s=budget_s)
    finally:
        torch.set_num_threads(prev)
        worker.close()
    return ms / len(jobs)


@dataclass(frozen=True)
class CpuExpertResult:
    expert_ms: dict[int, dict[int, float]]  # threads → {tokens → ms per call}
    best_threads: int
    dtype: str
    mode: str
    variant_ms: dict[str, float]  # "bf16/intra" → ms per call at CPU_PICK_TOKENS


def _fastest(times: dict[Any, float], slack: float = 0.05) -> Any:
    """The first key (in preference order) within `slack` of the best time: fewer threads and
    bf16 win near-ties, which leaves a core for the thread that drives the GPU."""
    best = min(times.values())
    return next(k for k, ms in times.items() if ms <= best * (1 + slack))


def measure_cpu_experts(hidden: int, inter: int, *, cores: int, tokens: tuple[int, ...] = TOKENS,
                        jobs: int = 8, repeats: int = 3, full_grid: bool = False,
                        budget_s: float | None = None,
                        tick: Callable[[str], None] = lambda label: None) -> CpuExpertResult:
    """Pick threads × dtype × mode for ~8-token calls, then time the chosen setup over tokens.

    Quick: variants at all cores, then threads for the best variant, then tokens at the best
    thread count. Full: every variant at every thread count, then tokens at every count.
    """
    rows = host_expert_rows(jobs, hidden, inter)
    counts = thread_counts(cores)
    pick = CPU_PICK_TOKENS

    def time_(dtype: str, mode: str, threads: int, n_tok: int) -> float:
        tick(f"CPU expert {dtype}/{mode}, {threads} thr, {n_tok} tok")
        return cpu_expert_call_ms(rows, hidden=hidden, inter=inter, tokens=n_tok,
                                  threads=threads, dtype=dtype, mode=mode, repeats=repeats,
                                  budget_s=budget_s)

    if full_grid:
        grid = {(th, dt, md): time_(dt, md, th, pick) for th in counts for dt, md in CPU_VARIANTS}
        threads, dtype, mode = _fastest(grid)
        variant_ms = {f"{dt}/{md}": grid[(threads, dt, md)] for dt, md in CPU_VARIANTS}
        expert_ms = {th: {n: grid[(th, dtype, mode)] if n == pick else time_(dtype, mode, th, n)
                          for n in tokens} for th in counts}
    else:
        variants = {v: time_(*v, cores, pick) for v in CPU_VARIANTS}
        dtype, mode = _fastest(variants)
        variant_ms = {f"{dt}/{md}": ms for (dt, md), ms in variants.items()}
        per_threads = {th: variants[(dtype, mode)] if th == cores else time_(dtype, mode, th, pick)
                       for th in counts}
        threads = _fastest(per_threads)
        expert_ms = {th: {pick: ms} for th, ms in per_threads.items()}
        curve = {n: per_threads[threads] if n == pick else time_(dtype, mode, threads, n)
                 for n in tokens}
        expert_ms[threads] = dict(sorted({pick: per_threads[threads], **curve}.items()))
    if threads == 1:
        mode = "intra"  # one thread has no pool: both modes are the same code path
    return CpuExpertResult(expert_ms=expert_ms, best_threads=threads, dtype=dtype, mode=mode,
                           variant_ms=variant_ms)

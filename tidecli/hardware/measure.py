"""Microbenchmarks behind a measured `HardwareProfile`.

Host↔GPU copies (pinned and pageable, one expert and large), copy latency, device memory
bandwidth, a bf16 GEMM, one MoE layer's experts on the GPU, host memory reads, and CPU expert
calls over tokens × threads × dtype × threading mode. Every figure is timed for real: warm-up,
then the median of repeats (CUDA events on the GPU, wall clock on the CPU). torch is imported
inside the functions so that importing this module stays cheap. The GPU measurements live in
gpu_measure.py, the CPU ones in cpu_measure.py and the timing helpers in timing.py; this module
assembles the profile.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidecli import __version__
from tidecli.experts.formats import FORMATS
from tidecli.hardware import probe
from tidecli.hardware.cpu_measure import (
    CPU_PICK_TOKENS,
    measure_cpu_experts,
    ram_read_gbps,
    thread_counts,
)
from tidecli.hardware.disk import disk_fields
from tidecli.hardware.gpu_measure import (
    copy_latency_ms,
    d2d_gbps,
    d2h_gbps,
    expert_bytes,
    gemm_tflops,
    gpu_expert_ms,
    h2d_gbps,
)
from tidecli.hardware.profile import HardwareProfile
from tidecli.hardware.timing import TOKENS

COMPRESSED_FORMATS = tuple(f for f in FORMATS if f != "bf16")
Progress = Callable[[str, int, int], None]  # (what is being measured, steps done, steps total)

DEFAULT_EXPERT_SHAPE = (2048, 512)  # LLaDA2.0-mini (hidden, moe_intermediate): 6 MiB in bf16


@dataclass(frozen=True)
class MeasureSettings:
    """How much to measure; QUICK keeps `tide profile --quick` well under a minute."""

    large_copy_bytes: int = 256 << 20
    copy_repeats: int = 10
    warmup: int = 3
    d2d_bytes: int = 256 << 20
    gemm_n: int = 4096
    gpu_tokens: tuple[int, ...] = TOKENS
    gpu_pool_experts: int = 64  # distinct experts a layer's routing draws from
    top_k: int = 8
    gpu_repeats: int = 10
    cpu_tokens: tuple[int, ...] = TOKENS
    cpu_jobs: int = 8  # expert calls per timed batch, each on its own weights (cold caches)
    cpu_repeats: int = 3
    cpu_full_grid: bool = False  # every dtype × mode × thread count; quick picks stage by stage
    cpu_budget_s: float = 0.3  # per setup: a pathologically slow one stops repeating early
    ram_bytes: int = 128 << 20
    disk_bytes: int = 128 << 20  # read of the model's (or the cache) folder, hardware/disk.py


QUICK = MeasureSettings()
FULL = MeasureSettings(large_copy_bytes=1 << 30, copy_repeats=30, warmup=5, d2d_bytes=1 << 30,
                       gemm_n=8192, gpu_repeats=30, cpu_jobs=16, cpu_repeats=7,
                       cpu_full_grid=True, cpu_budget_s=2.0, ram_bytes=1 << 30,
                       disk_bytes=1 << 30)


# ---------------------------------------------------------------- the whole profile


class _Ticker:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, label: str) -> None:
        if self.progress is not None:
            self.progress(label, min(self.done, self.total), self.total)
        self.done += 1

    def finish(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


def _cpu_steps(s: MeasureSettings, cores: int) -> int:
    n_threads, n_tokens = len(thread_counts(cores)), len(s.cpu_tokens)
    n_tokens -= CPU_PICK_TOKENS in s.cpu_tokens  # that point is reused, not timed again
    if s.cpu_full_grid:
        return 1 + 4 * n_threads + n_threads * n_tokens
    return 1 + 4 + (n_threads - 1) + n_tokens


def attempt(label: str, fn: Callable[[], Any], notes: list[str]) -> Any:
    """Run one measurement; a failure becomes a note, and the rest of the profile goes on."""
    try:
        return fn()
    except Exception as exc:  # OOM, a failed pin, a missing kernel: all worth a note only
        first = (str(exc).splitlines() or [""])[0][:160]
        notes.append(f"{label} not measured ({type(exc).__name__}: {first})")
        return None


def _release_cuda_memory() -> None:
    import torch

    torch.cuda.empty_cache()
    # pinned buffers go to torch's host cache; hand them back before a model is loaded
    empty_host = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) \
        or getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def _measure_formats(s: MeasureSettings, hidden: int, inter: int, device: Any, pool: int,
                     tick: _Ticker, notes: list[str]) -> dict[str, dict[int, float]]:
    """The compressed formats' dequantizing kernel, timed as bf16's grouped kernel is: its
    time is not bf16's scaled by the bytes (the kernel unpacks and scales in registers)."""
    import torch

    from tidecli.experts.qkernel import qkernel_available

    def one(fmt: str) -> tuple[dict[int, float], str, bool] | None:
        if not qkernel_available(device, torch.bfloat16, fmt):  # e.g. fp8 before sm89
            return None
        return gpu_expert_ms(hidden, inter, device=device, tokens=s.gpu_tokens,
                             pool_experts=pool, top_k=s.top_k, warmup=s.warmup,
                             repeats=s.gpu_repeats, fmt=fmt)

    out: dict[str, dict[int, float]] = {}
    for fmt in COMPRESSED_FORMATS:
        tick(f"GPU experts, {fmt}")
        res = attempt(f"GPU expert time in {fmt}", lambda fmt=fmt: one(fmt), notes)
        if res is not None and res[1] == "grouped_mm":
            out[fmt] = res[0]
    return out


def _measure_gpu(s: MeasureSettings, hidden: int, inter: int, tick: _Ticker,
                 notes: list[str]) -> dict[str, Any]:
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    uuid = str(getattr(props, "uuid", "") or "") or None
    facts = probe.probe_gpu(uuid=uuid, index=device.index or 0)
    if facts is None:
        notes.append("NVML unavailable: driver and PCIe link unknown")
    f: dict[str, Any] = {"gpu_name": torch.cuda.get_device_name(device),
                         "vram_total_bytes": int(total), "vram_free_bytes": int(free)}
    one = expert_bytes(hidden, inter)
    big = s.large_copy_bytes
    rep, warm = s.copy_repeats, s.warmup
    mib = f"{big >> 20} MiB"
    steps: tuple[tuple[str, str, Callable[[], float]], ...] = (
        ("h2d_pinned_expert_gbps", "H2D pinned, one expert",
         lambda: h2d_gbps(one, pinned=True, device=device, warmup=warm, repeats=rep * 3)),
        ("h2d_pinned_gbps", f"H2D pinned, {mib}",
         lambda: h2d_gbps(big, pinned=True, device=device, warmup=warm, repeats=rep)),
        ("h2d_pageable_expert_gbps", "H2D pageable, one expert",
         lambda: h2d_gbps(one, pinned=False, device=device, warmup=warm, repeats=rep * 3)),
        ("h2d_pageable_gbps", f"H2D pageable, {mib}",
         lambda: h2d_gbps(big, pinned=False, device=device, warmup=warm, repeats=rep)),
        ("d2h_pinned_gbps", f"D2H pinned, {mib}",
         lambda: d2h_gbps(big, device=device, warmup=warm, repeats=rep)),
        ("copy_latency_ms", "copy latency",
         lambda: copy_latency_ms(device=device, repeats=rep * 5)),
        # two buffers: stay well inside the free memory
        ("gpu_mem_gbps", "device memory bandwidth",
         lambda: d2d_gbps(min(s.d2d_bytes, max(1 << 20, int(free * 0.3))), device=device,
                          warmup=warm, repeats=rep)),
        ("gpu_bf16_tflops", "bf16 GEMM",
         lambda: gemm_tflops(s.gemm_n, device=device, warmup=warm, repeats=s.gpu_repeats)),
    )
    loaded = None
    for field, label, fn in steps:
        tick(label)
        f[field] = attempt(label, fn, notes)
        if field == "h2d_pinned_gbps":
            # read the link right after traffic: an idle GPU may drop to a slower generation
            loaded = probe.probe_gpu(uuid=uuid, index=device.index or 0)
    if f["h2d_pinned_expert_gbps"] is None and f["h2d_pinned_gbps"] is None:
        notes.append("pinned host memory failed: tide falls back to pageable copies (slower)")
    _release_cuda_memory()
    pool = max(s.top_k, min(s.gpu_pool_experts, int(free * 0.5) // one))
    done_tokens: list[int] = []

    def on_tokens(t: int) -> None:
        done_tokens.append(t)
        tick(f"GPU experts, {t} tok")

    res = attempt("GPU expert time", lambda: gpu_expert_ms(
        hidden, inter, device=device, tokens=s.gpu_tokens, pool_experts=pool, top_k=s.top_k,
        warmup=warm, repeats=s.gpu_repeats, on_tokens=on_tokens), notes)
    for _ in range(len(s.gpu_tokens) - len(done_tokens)):
        tick("GPU experts")  # keep the bar honest when the expert timing stopped early
    if res is not None:
        f["gpu_expert_ms"], f["gpu_expert_kernel"], f["gpu_expert_captured"] = res
        if not res[2]:
            notes.append("GPU experts timed outside a CUDA graph (the call could not be "
                         "captured): host launch gaps count, so expert times are high")
        if res[1] == "loop":
            notes.append("GPU experts timed with the per-expert loop (no grouped GEMM kernel "
                         "for this card / torch build)")
    formats = _measure_formats(s, hidden, inter, device, pool, tick, notes)
    if formats:
        f["gpu_expert_format_ms"] = formats
    _release_cuda_memory()
    last = loaded or facts
    if last is not None:
        f.update(driver=last.driver, pcie_gen_max=last.pcie_gen_max,
                 pcie_width_max=last.pcie_width_max)
    links = [(x.pcie_gen, x.pcie_width) for x in (facts, loaded)
             if x is not None and x.pcie_gen and x.pcie_width]
    if links:
        f["pcie_gen"], f["pcie_width"] = max(links, key=lambda gw: probe.pcie_peak_gbps(*gw) or 0)
        f["pcie_peak_gbps"] = probe.pcie_peak_gbps(f["pcie_gen"], f["pcie_width"])
        gmax, wmax = f.get("pcie_gen_max"), f.get("pcie_width_max")
        if gmax and wmax and (f["pcie_gen"] < gmax or f["pcie_width"] < wmax):
            notes.append(f"PCIe link ran at gen{f['pcie_gen']} x{f['pcie_width']} under load, "
                         f"below the gen{gmax} x{wmax} this slot and card allow "
                         "(check the slot, riser or BIOS)")
    return {k: v for k, v in f.items() if v is not None}


def measure_profile(*, quick: bool = True, expert_shape: tuple[int, int] | None = None,
                    progress: Progress | None = None, settings: MeasureSettings | None = None,
                    disk_folder: Any = None) -> HardwareProfile:
    """Probe and measure this machine. Without CUDA the profile is CPU-only and says so. The
    disk is read in `disk_folder` (the model's), else in the cache folder."""
    import torch

    s = settings or (QUICK if quick else FULL)
    hidden, inter = expert_shape or DEFAULT_EXPERT_SHAPE
    cpu = probe.probe_cpu()
    cores = max(1, cpu.physical_cores)
    cuda = torch.cuda.is_available()
    # copies, latency, D2D, GEMM, one per token count, one per compressed format
    gpu_steps = 8 + len(s.gpu_tokens) + len(COMPRESSED_FORMATS)
    tick = _Ticker((gpu_steps if cuda else 0) + _cpu_steps(s, cores) + 1, progress)
    notes: list[str] = [f"{'quick' if quick else 'full'} profile, torch {torch.__version__}"]
    fields: dict[str, Any] = {}
    if cuda:
        gpu = attempt("GPU", lambda: _measure_gpu(s, hidden, inter, tick, notes), notes)
        fields.update(gpu or {})  # a broken CUDA set-up still leaves a CPU profile
    else:
        seen = probe.probe_gpu()
        why = (f"NVML sees {seen.name} but this torch build cannot use CUDA"
               if seen is not None else "no CUDA GPU found")
        notes.append(f"{why}: GPU and PCIe measurements skipped, CPU-only profile")
    tick("host memory read")
    fields["ram_read_gbps"] = attempt(
        "host memory read", lambda: ram_read_gbps(s.ram_bytes, warmup=1,
                                                  repeats=max(3, s.cpu_repeats)), notes)
    tick("disk read")
    fields.update(attempt("disk read", lambda: disk_fields(disk_folder, s.disk_bytes, notes),
                           notes) or {})
    cpu_res = measure_cpu_experts(hidden, inter, cores=cores, tokens=s.cpu_tokens,
                                  jobs=s.cpu_jobs, repeats=s.cpu_repeats,
                                  full_grid=s.cpu_full_grid, budget_s=s.cpu_budget_s,
                                  tick=tick)
    fields.update(cpu_expert_ms=cpu_res.expert_ms, cpu_best_threads=cpu_res.best_threads,
                  cpu_mode=cpu_res.mode, cpu_dtype=cpu_res.dtype,
                  cpu_variant_ms=cpu_res.variant_ms)
    tick.finish()
    fields = {k: v for k, v in fields.items() if v is not None}
    cpu_facts = ("cpu_model", "cpu_physical_cores", "cpu_logical_cores", "cpu_features",
                 "ram_total_bytes", "ram_available_bytes")
    # "measured" covers facts read on this machine too; only the PCIe peak is computed
    sources = {k: "measured" for k in (*fields, *cpu_facts)
               if k not in ("gpu_expert_kernel", "gpu_expert_captured")}
    if "pcie_peak_gbps" in fields:
        sources["pcie_peak_gbps"] = "spec"  # computed from the link, not timed
    host = probe.hostname()
    name = f"{fields['gpu_name']} on {host}" if "gpu_name" in fields else f"CPU only on {host}"
    return HardwareProfile(
        name=name, kind="measured", created=datetime.date.today().isoformat(),
        tide_version=__version__, expert_shape=(hidden, inter), cpu_model=cpu.model,
        cpu_physical_cores=cpu.physical_cores, cpu_logical_cores=cpu.logical_cores,
        cpu_features=list(cpu.features), ram_total_bytes=cpu.ram_total_bytes,
        ram_available_bytes=cpu.ram_available_bytes, sources=sources, notes=notes, **fields)

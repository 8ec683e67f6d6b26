"""Hardware constants of the cost model, read from a `HardwareProfile` (and a calibration).

Expert times in a profile are measured at its `expert_shape`; small-batch expert GEMMs are
bound by reading the weights, so they are scaled by the ratio of expert bytes to this model's.
Missing figures fall back to estimates from bandwidths, each with a note saying so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tidecli.errors import TideError
from tidecli.hardware.profile import HardwareProfile
from tidecli.memory import device_dense_bytes
from tidecli.model.config import ModelConfig
from tidecli.units import GIB

# Per-layer fixed cost of a step on the GPU, beyond reading weights and the experts' grouped
# GEMMs: the small kernels of norms, QKV, RoPE, attention, routing and the expert glue at a few
# µs each. Fitted to the all-resident step of full-size synthetic mini on an H200 (eager
# 7.1-7.6 ms, compiled 4.7 ms per denoising step) with the experts timed as a captured profile
# times them (2.8 µs per expert at 32 tokens): eager 0.27 ms, compiled (`--compile on`, fused by
# Inductor) 0.135 ms per layer. Streamed tide predicted from them: docs/benchmarks.md, section
# 15. Calibration (`tide plan --calibrate`) corrects either.
LAUNCH_MS_PER_LAYER = 0.27
LAUNCH_MS_PER_LAYER_COMPILED = 0.135
# VRAM outside tide's budget: cuBLAS workspaces, allocator slack and, where the profile's free
# figure does not already exclude one, a CUDA context. Measured profiles read free memory after
# creating a context and reference profiles already keep 0.75 GiB back, so the low end suffices.
CUDA_CONTEXT_RESERVE_GIB = 0.5
# Fallbacks when a profile lacks a figure (each one adds a note to the plan).
FALLBACK_RAM_GBPS = 40.0
FALLBACK_GPU_MEM_GBPS = 300.0
FALLBACK_H2D_GBPS = 12.0  # PCIe 3.0 x16 / 4.0 x8 pinned
FALLBACK_COPY_LATENCY_MS = 0.01
FALLBACK_DISK_GBPS = 2.0  # a PCIe 3.0/4.0 NVMe SSD reading large files, stated when used
DISK_LATENCY_MS = 0.05  # per expert read (one or two positional reads of a few MiB)
# One MoE layer's hand-off to the host in the host-driven runtime, per miss mode, when the
# profile has no measurement (`tide profile` measures it): what an H200 host measured
# (docs/benchmarks.md, section 11).
FALLBACK_HOST_LAYER_MS = {"cpu": 0.09, "gpu": 0.118}


@dataclass(frozen=True)
class Calibration:
    """Corrections fitted on real steps (see calibrate.py); 1.0 = trust the profile."""

    gpu_scale: float = 1.0  # device bandwidth terms: dense weights + KV read, resident experts
    cpu_scale: float = 1.0  # missed expert calls on the host
    io_scale: float = 1.0  # host → device expert copies
    launch_ms_per_layer: float | None = None  # measured fixed cost per layer; None → constant
    overlap: bool = True  # False: misses share the processor with the rest (a CPU device)

    def to_dict(self) -> dict:
        launch = self.launch_ms_per_layer
        return {"gpu_scale": round(self.gpu_scale, 4), "cpu_scale": round(self.cpu_scale, 4),
                "io_scale": round(self.io_scale, 4),
                "launch_ms_per_layer": None if launch is None else round(launch, 4),
                "overlap": self.overlap}


@dataclass(frozen=True)
class HardwareCosts:
    c_io_ms: float  # C_IO: one expert host → device (pinned, into a preallocated slot)
    gpu_expert_ms: float  # one resident expert used by one step of `block_length` tokens
    dense_ms: float  # one step's dense part: weights + KV read, plus launch overhead
    dense_read_ms: float  # the bandwidth part of dense_ms
    launch_ms: float  # the overhead part of dense_ms
    cpu_threads: int
    cpu_points: tuple[tuple[float, float], ...]  # (tokens, ms) of one expert call on the host
    overlap: bool = True
    notes: tuple[str, ...] = field(default=())
    disk_expert_ms: float = 0.0  # one expert read from the checkpoint's files (disk tier)
    # one MoE layer's hand-off to the host (host-driven runtime), per miss mode
    host_layer_ms: dict[str, float] = field(default_factory=dict)
    host_layer_measured: bool = True  # False: FALLBACK_HOST_LAYER_MS, not this machine's

    def host_ms(self, mode: str) -> float:
        """A MoE layer's hand-off under miss mode `mode`: split does both sides' work."""
        h = self.host_layer_ms
        if mode == "split":
            return (h.get("cpu", 0.0) + h.get("gpu", 0.0)) / 2
        return h.get(mode, 0.0)

    def cpu_call_ms(self, tokens: np.ndarray | float) -> np.ndarray | float:
        """One expert call with `tokens` tokens on the host: linear between measured points,
        extended linearly beyond the last two (more tokens never cost less)."""
        xs = np.array([p[0] for p in self.cpu_points])
        ys = np.array([p[1] for p in self.cpu_points])
        t = np.asarray(tokens, dtype=np.float64)
        out = np.interp(t, xs, ys)
        if len(xs) >= 2:
            slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
            out = np.where(t > xs[-1], ys[-1] + slope * (t - xs[-1]), out)
        return out if out.ndim else float(out)

    def c_cpu_ms(self, tokens_per_call: np.ndarray | float) -> np.ndarray | float:
        """C_CPU: host cost per missed (token, expert) pair at that many tokens per call."""
        n = np.maximum(np.asarray(tokens_per_call, dtype=np.float64), 1.0)
        out = self.cpu_call_ms(n) / n
        return out if np.ndim(out) else float(out)

    def to_dict(self) -> dict:
        return {"c_io_ms": round(self.c_io_ms, 5), "gpu_expert_ms": round(self.gpu_expert_ms, 5),
                "dense_ms": round(self.dense_ms, 4), "launch_ms": round(self.launch_ms, 4),
                "cpu_threads": self.cpu_threads,
                "cpu_expert_ms": {str(int(n)) if float(n).is_integer() else str(n): round(ms, 5)
                                  for n, ms in self.cpu_points},
                "disk_expert_ms": round(self.disk_expert_ms, 4),
                "host_layer_ms": {m: round(v, 4) for m, v in self.host_layer_ms.items()},
                "overlap": self.overlap}


def profile_vram_gib(profile: HardwareProfile) -> float:
    """The default budget: the profile's free VRAM (else its total) minus the CUDA context."""
    if profile.gpu_name is None and not profile.vram_total_bytes:
        raise TideError(f"the profile {profile.name!r} describes a machine without a CUDA GPU",
                        "pass --profile with a GPU's profile (e.g. rtx4090), or --vram GiB")
    avail = profile.vram_free_bytes or profile.vram_total_bytes
    gib = avail / GIB - CUDA_CONTEXT_RESERVE_GIB
    if gib <= 0:
        raise TideError(f"the profile {profile.name!r} reports no free VRAM",
                        "pass --vram GiB, or re-run `tide profile` with the GPU idle")
    return gib


def _interp_table(table: dict[int, float], x: float) -> float:
    keys = sorted(table)
    return float(np.interp(x, keys, [table[k] for k in keys]))


Points = tuple[tuple[float, float], ...]


def _cpu_table(cfg: ModelConfig, profile: HardwareProfile, scale: float, tokens_per_call: float,
               threads: int | None, notes: list[str],
               max_threads: int | None = None) -> tuple[int, Points]:
    tables = {t: m for t, m in profile.cpu_expert_ms.items() if m}
    if tables:
        if threads:  # the runtime runs exactly this many: their row, else the nearest below
            best = threads if threads in tables else \
                max((t for t in tables if t <= threads), default=min(tables))
            if best != threads:
                notes.append(f"CPU expert times for {threads} threads are the profile's for "
                             f"{best} (no row for {threads})")
        else:  # the runtime follows the plan: the profile's best within the CPUs it may use
            usable = {t: m for t, m in tables.items() if max_threads is None or t <= max_threads}
            usable = usable or {min(tables): tables[min(tables)]}
            best = profile.cpu_best_threads if profile.cpu_best_threads in usable else \
                min(usable, key=lambda t: _interp_table(usable[t], tokens_per_call))
        pts = tuple((float(n), ms * scale) for n, ms in sorted(tables[best].items()))
        if len(pts) == 1:  # one point: assume the weight read dominates, flat in tokens
            pts = pts + ((pts[0][0] * 2, pts[0][1]),)
        return int(best), pts
    gbps = profile.ram_read_gbps or FALLBACK_RAM_GBPS
    notes.append(f"CPU expert times estimated from RAM bandwidth ({gbps:g} GB/s): "
                 "run `tide profile` on that machine for measured ones")
    # one call reads the expert once (~75 % of peak), compute adds a little per token
    read_ms = cfg.expert_bytes() / (0.75 * gbps * 1e9) * 1e3
    threads = threads or profile.cpu_best_threads or profile.cpu_physical_cores or 8
    return int(threads), ((1.0, read_ms), (64.0, read_ms * 2.0))


def _h2d_gbps(profile: HardwareProfile, notes: list[str]) -> float:
    if profile.h2d_pinned_expert_gbps:
        return profile.h2d_pinned_expert_gbps
    if profile.h2d_pinned_gbps:
        return profile.h2d_pinned_gbps
    if profile.h2d_pageable_expert_gbps or profile.h2d_pageable_gbps:
        notes.append("no pinned host→GPU figure in the profile: expert copies are planned at the "
                     "pageable bandwidth")
        return float(profile.h2d_pageable_expert_gbps or profile.h2d_pageable_gbps)
    if profile.pcie_peak_gbps:
        notes.append("host→GPU bandwidth estimated as 80 % of the PCIe link's peak")
        return 0.8 * profile.pcie_peak_gbps
    notes.append(f"no host→GPU bandwidth in the profile: assumed {FALLBACK_H2D_GBPS:g} GB/s")
    return FALLBACK_H2D_GBPS


def disk_gbps(profile: HardwareProfile) -> tuple[float, str | None]:
    """The disk's sequential read bandwidth for the cost model, and a note when it is not a
    cold measurement."""
    if profile.disk_read_gbps:
        if profile.disk_read_cold is False:
            return profile.disk_read_gbps, (
                f"disk read {profile.disk_read_gbps:.2f} GB/s was measured warm (the page cache "
                "could not be dropped): reads of experts not in the cache can be slower")
        return profile.disk_read_gbps, None
    return FALLBACK_DISK_GBPS, (f"no disk read figure in the profile: assumed "
                                f"{FALLBACK_DISK_GBPS:g} GB/s (an NVMe SSD); run `tide profile "
                                "--model FOLDER` for the disk that holds the model")


def hardware_costs(*, cfg: ModelConfig, profile: HardwareProfile, block_length: int,
                   context_tokens: int, tokens_per_call: float = 4.0,
                   cpu_threads: int | None = None, max_cpu_threads: int | None = None,
                   calibration: Calibration | None = None,
                   expert_bytes: int | None = None,
                   experts_format: str = "bf16", compiled: bool = False) -> HardwareCosts:
    """`cpu_threads` picks that row of the profile's CPU table (else the nearest below it);
    without it, the profile's best, else the fastest at `tokens_per_call`, among the rows of at
    most `max_cpu_threads` (the CPUs this process may run on). `expert_bytes`: one compressed
    expert of `experts_format` (experts/formats.py): copies and disk reads scale with its bytes;
    the GPU's expert time is the profile's measurement of that format's kernel, else bf16's
    scaled by the bytes (an estimate, low where the kernel is not bound by reading the weights);
    the CPU dequantizes, then multiplies as in bf16."""
    cal = calibration or Calibration()
    notes: list[str] = []
    ph, pi = profile.expert_shape
    scale = cfg.expert_params / (3 * ph * pi)
    if abs(scale - 1) > 1e-9:
        notes.append(f"expert times scaled ×{scale:.3g} from the profile's expert shape "
                     f"({ph}×{pi}) to this model's ({cfg.hidden_size}×{cfg.moe_intermediate_size})")
    eb = expert_bytes or cfg.expert_bytes()
    weights = eb / cfg.expert_bytes()  # the share of bf16's bytes a GPU expert call reads
    measured = profile.gpu_expert_format_ms.get(experts_format) if expert_bytes else None
    if expert_bytes:
        gpu_how = (f"the GPU's expert time as measured for the {experts_format} kernel"
                   if measured else
                   f"the GPU's expert time scaled from bf16's by the bytes (not measured for "
                   f"{experts_format} in this profile: `tide profile` on the machine measures it)")
        notes.append(f"compressed experts: {eb / 2**20:.2f} MiB each ({weights:.2f}× bf16's) for "
                     f"copies and disk reads; {gpu_how}; CPU expert times as bf16's")
    c_io = eb / (_h2d_gbps(profile, notes) * 1e9) * 1e3
    c_io += profile.copy_latency_ms if profile.copy_latency_ms is not None \
        else FALLBACK_COPY_LATENCY_MS
    mem = profile.gpu_mem_gbps
    if not mem:
        mem = FALLBACK_GPU_MEM_GBPS
        notes.append(f"no device memory bandwidth in the profile: assumed {mem:g} GB/s")
    if measured:
        gpu_expert = _interp_table(measured, block_length) * scale
    elif profile.gpu_expert_ms:
        gpu_expert = _interp_table(profile.gpu_expert_ms, block_length) * scale * weights
    else:
        notes.append("GPU expert time estimated from device memory bandwidth")
        gpu_expert = eb / (0.7 * mem * 1e9) * 1e3 + 0.005
    if profile.gpu_expert_ms and profile.sources.get("gpu_expert_ms") == "measured" \
            and profile.gpu_expert_captured is not True:
        notes.append("this profile's GPU expert times were taken outside a CUDA graph (the "
                     "host's launch gaps counted), so the experts' term is high: re-run "
                     "`tide profile` for captured ones")
    # a step reads every dense weight once and, on average, half the context's KV cache
    read = device_dense_bytes(cfg) + cfg.kv_bytes_per_token() * context_tokens // 2
    read_ms = read / (mem * 1e9) * 1e3
    per_layer = cal.launch_ms_per_layer
    if per_layer is None:
        per_layer = LAUNCH_MS_PER_LAYER_COMPILED if compiled else LAUNCH_MS_PER_LAYER
    launch = per_layer * cfg.num_hidden_layers
    threads, pts = _cpu_table(cfg, profile, scale, tokens_per_call, cpu_threads, notes,
                              max_cpu_threads)
    disk = eb / (disk_gbps(profile)[0] * 1e9) * 1e3 + DISK_LATENCY_MS
    host_layer = profile.host_layer_ms
    return HardwareCosts(
        c_io_ms=c_io * cal.io_scale, gpu_expert_ms=gpu_expert * cal.gpu_scale,
        dense_ms=read_ms * cal.gpu_scale + launch, dense_read_ms=read_ms * cal.gpu_scale,
        launch_ms=launch, cpu_threads=threads,
        cpu_points=tuple((n, ms * cal.cpu_scale) for n, ms in pts), overlap=cal.overlap,
        notes=tuple(notes), disk_expert_ms=disk,
        host_layer_ms=dict(host_layer or FALLBACK_HOST_LAYER_MS),
        host_layer_measured=bool(host_layer))

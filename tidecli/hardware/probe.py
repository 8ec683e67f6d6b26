"""Facts about this machine that need no benchmark: GPU, PCIe link, driver, CPU, ISA, RAM.

The GPU side comes from NVML (`pynvml`, imported lazily); any NVML failure just leaves those
facts unknown. Nothing here imports torch: `tide profile --list` and the saved-profile lookup
stay cheap.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# GB/s per lane and direction after line coding: 8b/10b for gen 1-2, 128b/130b for gen 3-5,
# FLIT (242/256 payload) for gen 6.
PCIE_GBPS_PER_LANE: dict[int, float] = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}

# ISA extensions that change how fast a CPU runs an expert (bf16 dot products, AMX tiles).
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def pcie_peak_gbps(gen: int | None, width: int | None) -> float | None:
    """Theoretical bandwidth of a PCIe link per direction in GB/s (None when unknown)."""
    if not gen or not width or gen not in PCIE_GBPS_PER_LANE or width <= 0:
        return None
    return round(PCIE_GBPS_PER_LANE[gen] * width, 3)


@dataclass(frozen=True)
class GpuFacts:
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    driver: str | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None

    @property
    def pcie_peak_gbps(self) -> float | None:
        return pcie_peak_gbps(self.pcie_gen, self.pcie_width)


@dataclass(frozen=True)
class CpuFacts:
    model: str
    physical_cores: int
    logical_cores: int
    features: list[str] = field(default_factory=list)
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_call(fn, *args):  # type: ignore[no-untyped-def]
    """One NVML query; None when the device or driver does not support it."""
    try:
        return fn(*args)
    except Exception:
        return None


def probe_gpu(*, uuid: str | None = None, index: int = 0) -> GpuFacts | None:
    """NVML facts for one GPU, found by UUID (as CUDA reports it) or else by NVML index.

    None when NVML is missing, fails, or has no such device. The current PCIe link may read
    low on an idle GPU (power saving); probe again right after a transfer for the live link.
    """
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = None
        if uuid:
            nvml_uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            handle = _nvml_call(pynvml.nvmlDeviceGetHandleByUUID, nvml_uuid)
            if handle is None and _nvml_call(pynvml.nvmlDeviceGetCount) != 1:
                return None  # several GPUs and no match: better unknown than the wrong card
        if handle is None:
            handle = _nvml_call(pynvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            return None
        mem = _nvml_call(pynvml.nvmlDeviceGetMemoryInfo, handle)
        driver = _nvml_call(pynvml.nvmlSystemGetDriverVersion)
        return GpuFacts(
            name=_text(_nvml_call(pynvml.nvmlDeviceGetName, handle) or "unknown GPU"),
            vram_total_bytes=int(mem.total) if mem is not None else 0,
            vram_free_bytes=int(mem.free) if mem is not None else 0,
            driver=_text(driver) if driver is not None else None,
            pcie_gen=_nvml_call(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, handle),
            pcie_width=_nvml_call(pynvml.nvmlDeviceGetCurrPcieLinkWidth, handle),
            pcie_gen_max=_nvml_call(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, handle),
            pcie_width_max=_nvml_call(pynvml.nvmlDeviceGetMaxPcieLinkWidth, handle),
        )
    finally:
        _nvml_call(pynvml.nvmlShutdown)


# ---------------------------------------------------------------- CPU and RAM


def cpu_features_from_flags(flags: Iterable[str]) -> list[str]:
    """The features in CPU_FEATURES present in a /proc/cpuinfo flag list, in that order."""
    have = {f.strip().lower() for f in flags}
    return [f for f in CPU_FEATURES if f in have]


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; empty when unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", []
    model, flags = "", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = value.split()
        if model and flags:
            break
    return model, flags


def _cpu_model_elsewhere() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _features_elsewhere() -> list[str]:
    """Best effort without /proc/cpuinfo: ask torch which vector ISA it dispatches to."""
    try:
        import torch  # only reached off Linux, where the command imports torch anyway
    except Exception:
        return []
    cap = str(torch.backends.cpu.get_cpu_capability()).lower()  # "avx2", "avx512", ...
    feats = []
    if "avx2" in cap or "avx512" in cap:
        feats.append("avx2")
    if "avx512" in cap:
        feats.append("avx512f")
    return feats


def usable_cores() -> int:
    """Logical CPUs this process may run on (affinity and containers included)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


# CPU features with bf16 dot products: an expert there runs faster in bf16 than in fp32 (half the
# bytes read; docs/benchmarks.md, "The CPU's dtype and threads")
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_computes_bf16() -> bool:
    """Does this CPU have bf16 dot-product units (AVX-512 BF16 or AMX)? Read from
    /proc/cpuinfo; False where it cannot be told."""
    _, flags = _cpuinfo()
    return any(f in cpu_features_from_flags(flags) for f in BF16_FEATURES)


def threads_for(cores: int, busy: float) -> int:
    """Threads for `cores` usable physical cores when other processes keep `busy` of them
    busy: one per core left free (OpenMP threads spin on a shared core and slow everything)."""
    return max(1, cores - int(busy + 0.5))


def free_cpu_threads(sample_s: float = 0.05) -> int:
    """Threads for this process: the usable physical cores less those other processes keep
    busy right now (their load over `sample_s`)."""
    import psutil

    usable = usable_cores()
    physical = min(psutil.cpu_count(logical=False) or usable, usable)
    per_cpu = psutil.cpu_percent(interval=sample_s, percpu=True)
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(len(per_cpu))
    busy_logical = sum(per_cpu[i] for i in mine if i < len(per_cpu)) / 100
    # hyper-threads share a core: a busy logical CPU takes its share of a physical one
    return threads_for(physical, busy_logical * physical / max(usable, 1))


def probe_cpu() -> CpuFacts:
    import psutil

    model, flags = _cpuinfo()
    features = cpu_features_from_flags(flags) if flags else _features_elsewhere()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical  # None on some VMs
    # a container or taskset may give us fewer CPUs than the machine has
    usable = usable_cores()
    logical = min(logical, usable)
    physical = min(physical, logical)
    vm = psutil.virtual_memory()
    return CpuFacts(model=model or _cpu_model_elsewhere(), physical_cores=int(physical),
                    logical_cores=int(logical), features=features,
                    ram_total_bytes=int(vm.total), ram_available_bytes=int(vm.available))


def hostname() -> str:
    return socket.gethostname() or platform.node() or "localhost"


def slug(text: str) -> str:
    """Lower-case, alphanumerics and single dashes: safe in a file name on every OS."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unnamed"

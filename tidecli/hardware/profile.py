"""`HardwareProfile`: what the planner knows about a machine. Plain data, saved as JSON.

Every figure says where it came from in `sources` (field name → "measured" | "spec" |
"estimated"), so a reference profile for a card we do not own is honest about which numbers are
public specifications. Bandwidths are GB/s (1e9 bytes/s); times are milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tidecli.errors import TideError
from tidecli.fsutil import atomic_write_json

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class HardwareProfile:
    name: str  # e.g. "NVIDIA H200 on <host>" or "RTX 4090 24 GB (reference)"
    kind: str = "measured"  # "measured" (tide profile on this machine) | "reference"
    schema: int = SCHEMA_VERSION
    created: str = ""  # ISO date
    tide_version: str = ""
    # ---- GPU ----
    gpu_name: str | None = None  # None: no CUDA GPU (CPU-only profile)
    vram_total_bytes: int = 0
    vram_free_bytes: int = 0
    driver: str | None = None
    pcie_gen: int | None = None  # current link
    pcie_width: int | None = None
    pcie_gen_max: int | None = None
    pcie_width_max: int | None = None
    pcie_peak_gbps: float | None = None  # theoretical per direction for the current link
    gpu_mem_gbps: float | None = None  # device memory bandwidth (read + write counted)
    gpu_bf16_tflops: float | None = None
    # spec-sheet peaks (reference profiles), so achieved figures can be shown against them
    gpu_mem_peak_gbps: float | None = None
    gpu_bf16_peak_tflops: float | None = None  # dense tensor cores, fp32 accumulate
    # ---- host ↔ GPU copies ----
    h2d_pinned_gbps: float | None = None  # large pinned transfers
    h2d_pinned_expert_gbps: float | None = None  # one expert of `expert_shape` per copy
    h2d_pageable_gbps: float | None = None
    h2d_pageable_expert_gbps: float | None = None
    d2h_pinned_gbps: float | None = None
    copy_latency_ms: float | None = None  # fixed cost of one small async copy
    # one MoE layer handed to the host by the host-driven runtime, per miss mode ("cpu",
    # "gpu"): the step replayed in pieces, the routing read by the host, the misses grouped and
    # put back, Python between; (host-driven − resident) ms per forward / MoE layers on a tiny
    # model with half of each layer's experts in slots (runtime/handoff.py)
    host_layer_ms: dict[str, float] = field(default_factory=dict)
    # ---- expert compute, for expert_shape = (hidden, moe_intermediate) in bf16 ----
    expert_shape: tuple[int, int] = (2048, 512)
    # GPU: one layer's experts in grouped kernels: tokens-per-step → ms per *expert* used
    gpu_expert_ms: dict[int, float] = field(default_factory=dict)
    gpu_expert_kernel: str | None = None  # "grouped_mm" | "loop" (see experts/compute.py)
    # True: timed as a CUDA graph's replay, as the runtime's captured step runs the experts;
    # None in profiles measured before it was (their times count the host's launch gaps)
    gpu_expert_captured: bool | None = None
    # the same for compressed experts (experts/formats.py) through their dequantizing kernel:
    # format → tokens-per-step → ms per expert used (measured ones only)
    gpu_expert_format_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    # CPU: threads → {tokens → ms for one expert call}
    cpu_expert_ms: dict[int, dict[int, float]] = field(default_factory=dict)
    cpu_best_threads: int | None = None
    cpu_mode: str = "intra"  # "intra" | "experts" (see experts/cpu.py)
    cpu_dtype: str = "bf16"  # "bf16" | "fp32"
    # every dtype/mode tried: "bf16/intra" → ms per expert call at ~8 tokens
    cpu_variant_ms: dict[str, float] = field(default_factory=dict)
    # ---- CPU and RAM ----
    cpu_model: str = ""
    cpu_physical_cores: int = 0
    cpu_logical_cores: int = 0
    cpu_features: list[str] = field(default_factory=list)  # avx2, avx512f, avx512_bf16, amx_bf16
    ram_total_bytes: int = 0
    ram_available_bytes: int = 0
    ram_read_gbps: float | None = None
    # sequential read of the model's folder (else the cache folder): cold = page cache dropped
    # first (`disk_read_cold` True); when it could not be dropped the figure is warm (False)
    disk_read_gbps: float | None = None
    disk_read_warm_gbps: float | None = None  # the same file again, from the page cache
    disk_read_cold: bool | None = None
    # ---- provenance ----
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expert_shape"] = list(self.expert_shape)
        d["gpu_expert_ms"] = {str(k): v for k, v in self.gpu_expert_ms.items()}
        d["gpu_expert_format_ms"] = {f: {str(k): v for k, v in m.items()}
                                     for f, m in self.gpu_expert_format_ms.items()}
        d["cpu_expert_ms"] = {str(t): {str(k): v for k, v in m.items()}
                              for t, m in self.cpu_expert_ms.items()}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HardwareProfile:
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError("not a hardware profile")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in raw.items() if k in known}
        if "expert_shape" in kw:
            kw["expert_shape"] = tuple(int(x) for x in kw["expert_shape"])
        if "gpu_expert_ms" in kw:
            kw["gpu_expert_ms"] = {int(k): float(v) for k, v in kw["gpu_expert_ms"].items()}
        if "gpu_expert_format_ms" in kw:
            kw["gpu_expert_format_ms"] = {str(f): {int(k): float(v) for k, v in m.items()}
                                          for f, m in kw["gpu_expert_format_ms"].items()}
        if "cpu_expert_ms" in kw:
            kw["cpu_expert_ms"] = {int(t): {int(k): float(v) for k, v in m.items()}
                                   for t, m in kw["cpu_expert_ms"].items()}
        if "host_layer_ms" in kw:
            raw_h = kw["host_layer_ms"]
            kw["host_layer_ms"] = {str(k): float(v) for k, v in raw_h.items()} \
                if isinstance(raw_h, dict) else {}
        if "cpu_variant_ms" in kw:
            kw["cpu_variant_ms"] = {str(k): float(v) for k, v in kw["cpu_variant_ms"].items()}
        return cls(**kw)

    def save(self, path: str | Path, *, make_parents: bool = False) -> Path:
        return atomic_write_json(path, self.to_dict(), make_parents=make_parents)


def load_profile_file(path: str | Path) -> HardwareProfile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return HardwareProfile.from_dict(raw)
    except FileNotFoundError as exc:
        raise TideError(f"no profile at {path}",
                        "run `tide profile` or pass --profile NAME") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError,
            AttributeError, RecursionError) as exc:
        raise TideError(f"the hardware profile {path} is corrupt ({type(exc).__name__})",
                        "delete it and run `tide profile` again") from exc

"""The planner's answer as plain data: what sits on the GPU, B_ℓ, τ, threads, predicted time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tidecli.memory import pool_bytes
from tidecli.planner.model import Breakdown
from tidecli.planner.report import CalibrationReport


@dataclass(frozen=True)
class PlanSummary:
    """What a run following a plan shows (start-up panel, `--json`)."""

    profile: str
    tau: int
    misses: str
    experts_per_layer: dict[int, int]
    predicted_step_ms: float
    predicted_steps_per_s: float
    predicted_tokens_per_s: float
    calibrated: bool

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "tau": self.tau, "misses": self.misses,
                "experts_per_layer": {str(k): v for k, v in self.experts_per_layer.items()},
                "predicted_step_ms": round(self.predicted_step_ms, 3),
                "predicted_steps_per_s": round(self.predicted_steps_per_s, 2),
                "predicted_tokens_per_s": round(self.predicted_tokens_per_s, 2),
                "calibrated": self.calibrated}


@dataclass(frozen=True)
class Plan:
    model: str
    profile: str
    policy: str  # "tide", or "resident" when every expert fits
    vram_budget_bytes: int
    dense_bytes: int  # dense weights on the device (embedding table stays on the host)
    kv_cache_bytes: int  # for `context_tokens`
    workspace_bytes: int
    expert_bytes: int  # one routed expert
    experts_per_layer: dict[int, int]  # B_ℓ, keyed by model layer index
    uniform: bool
    tau: int
    tau_costs_ms: tuple[float, ...]  # the τ program's objective for τ = 1..T−1 (ms per block)
    cpu_threads: int
    cpu_mode: str
    block_length: int
    steps_per_block: int
    tokens_per_step: float
    context_tokens: int
    breakdown: Breakdown
    routing_source: str  # "trace" | "published"
    distinct_experts: tuple[float, ...]  # per MoE layer, per step
    drift: tuple[float, ...]  # d_ℓ at the chosen B_ℓ
    constants: dict[str, Any] = field(default_factory=dict)
    alternatives: dict[str, float] = field(default_factory=dict)  # predicted step ms
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    calibration: CalibrationReport | None = None  # `tide plan --calibrate`: predicted vs measured
    # host tiers (planner/tiers.py): RAM for the expert store, experts per layer kept in RAM,
    # the staging ring; the other experts stay on disk, read at `disk_gbps` when missed
    num_experts: int = 0
    ram_budget_bytes: int = 0  # 0: not known (every expert assumed to fit in RAM)
    experts_in_ram: dict[int, int] = field(default_factory=dict)
    staging_experts: int = 0
    disk_gbps: float | None = None  # set when some experts stay on disk
    misses: str = "cpu"  # where missed experts run (experts/modes.py), never "auto"
    cpu_dtype: str = "bf16"  # what CPU misses compute in: the profile's fastest, as it measured
    experts_format: str = "bf16"  # the routed experts' format (experts/formats.py)
    compiled: bool = False  # planned for compiled steps (--compile on)

    @property
    def predicted_step_ms(self) -> float:
        return self.breakdown.step_ms

    @property
    def steps_per_s(self) -> float:
        return 1000.0 / self.predicted_step_ms if self.predicted_step_ms > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        """A block takes T denoising steps plus one pass that writes its K/V to the cache."""
        per_block_ms = (self.steps_per_block + 1) * self.predicted_step_ms
        return self.block_length * 1000.0 / per_block_ms if per_block_ms > 0 else 0.0

    @property
    def slot_bytes(self) -> int:
        return pool_bytes(self.experts_per_layer.values(), self.expert_bytes)

    @property
    def used_bytes(self) -> int:
        return self.dense_bytes + self.kv_cache_bytes + self.workspace_bytes + self.slot_bytes

    @property
    def disk_experts(self) -> int:
        if not self.experts_in_ram:
            return 0
        return self.num_experts * len(self.experts_in_ram) - sum(self.experts_in_ram.values())

    @property
    def tiered(self) -> bool:
        return self.disk_experts > 0

    def tiers(self) -> dict[str, Any]:
        """GPU slots, host RAM, disk: experts and bytes in each."""
        eb, gpu = self.expert_bytes, sum(self.experts_per_layer.values())
        layers = len(self.experts_per_layer)
        in_ram = sum(self.experts_in_ram.values()) if self.experts_in_ram else \
            self.num_experts * layers
        return {
            "gpu": {"experts": gpu, "bytes": self.slot_bytes},
            "ram": {"experts": in_ram, "bytes": in_ram * eb,
                    "staging_experts": self.staging_experts,
                    "staging_bytes": self.staging_experts * eb,
                    "budget_bytes": self.ram_budget_bytes or None,
                    "per_layer": {str(k): v for k, v in self.experts_in_ram.items()}},
            "disk": {"experts": self.disk_experts, "bytes": self.disk_experts * eb,
                     "read_gbps": self.disk_gbps},
        }

    def summary(self) -> PlanSummary:
        return PlanSummary(profile=self.profile, tau=self.tau, misses=self.misses,
                           experts_per_layer=dict(self.experts_per_layer),
                           predicted_step_ms=self.predicted_step_ms,
                           predicted_steps_per_s=self.steps_per_s,
                           predicted_tokens_per_s=self.tokens_per_s,
                           calibrated="calibration" in self.constants)

    def to_dict(self) -> dict[str, Any]:
        bs = list(self.experts_per_layer.values())
        return {
            "model": self.model,
            "profile": self.profile,
            "policy": self.policy,
            "experts_format": self.experts_format,
            "compiled": self.compiled,
            "experts_per_layer": {str(k): v for k, v in self.experts_per_layer.items()},
            "experts_per_layer_uniform": bs[0] if self.uniform and bs else None,
            "tau": self.tau,
            "misses": self.misses,
            "cpu_threads": self.cpu_threads,
            "cpu_mode": self.cpu_mode,
            "cpu_dtype": self.cpu_dtype,
            "predicted_step_ms": round(self.predicted_step_ms, 4),
            "predicted_steps_per_s": round(self.steps_per_s, 3),
            "predicted_tokens_per_s": round(self.tokens_per_s, 3),
            "breakdown": self.breakdown.to_dict(),
            "memory": {
                "budget_bytes": self.vram_budget_bytes, "dense_bytes": self.dense_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "workspace_bytes": self.workspace_bytes,
                "expert_bytes": self.expert_bytes, "slot_bytes": self.slot_bytes,
                "used_bytes": self.used_bytes,
            },
            "decoding": {"block_length": self.block_length,
                         "steps_per_block": self.steps_per_block,
                         "tokens_per_step": round(self.tokens_per_step, 3),
                         "context_tokens": self.context_tokens},
            "tau_costs_ms": [round(c, 4) for c in self.tau_costs_ms],
            "routing_source": self.routing_source,
            "distinct_experts_per_step": [round(x, 2) for x in self.distinct_experts],
            "drift": [round(x, 5) for x in self.drift],
            "constants": self.constants,
            "alternatives": {k: round(v, 4) for k, v in self.alternatives.items()},
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "tiers": self.tiers(),
        }

"""What a calibration run measured, and predicted against measured (planner/calibration.py)."""

from __future__ import annotations

from dataclasses import dataclass

from tidecli.experts.trace import RoutingTrace
from tidecli.planner.costs import Calibration
from tidecli.planner.model import Breakdown


@dataclass(frozen=True, eq=False)
class Measurement:
    device: str
    overlap: bool  # misses overlap device compute (a CUDA device)
    steps: int  # denoising steps measured (the first, which fills empty slots, is left out)
    step_ms: float  # means per step
    cpu_ms: float
    copy_ms: float
    stall_ms: float
    hit_rate: float
    trace: RoutingTrace
    reads: float = 0.0  # experts moved host → GPU per step (copied or read by the GPU)
    compiled: bool = False  # the steps ran compiled (--compile on)

    def to_dict(self) -> dict:
        return {"device": self.device, "compiled": self.compiled, "steps": self.steps,
                "step_ms": round(self.step_ms, 4),
                "cpu_ms": round(self.cpu_ms, 4), "copy_ms": round(self.copy_ms, 4),
                "stall_ms": round(self.stall_ms, 4), "hit_rate": round(self.hit_rate, 4),
                "reads_per_step": round(self.reads, 3)}


@dataclass(frozen=True)
class CalibrationReport:
    """Predicted against measured for one calibration run (shown by `tide plan --calibrate`)."""

    measured: Measurement
    measured_plan: dict  # B_ℓ, τ, threads and misses of the plan that ran
    profile_only: Breakdown  # the prediction before the run
    with_trace: Breakdown  # the same plan, the run's own routing
    calibrated: Breakdown  # and the fitted corrections
    scales: Calibration
    measured_over_predicted: float
    saved_to: str | None = None

    @property
    def streamed(self) -> bool:
        return self.measured_plan.get("misses") == "stream"

    def to_dict(self) -> dict:
        return {"measured": self.measured.to_dict(), "measured_plan": self.measured_plan,
                "predicted_profile_only": self.profile_only.to_dict(),
                "predicted_with_trace": self.with_trace.to_dict(),
                "predicted_calibrated": self.calibrated.to_dict(),
                "scales": self.scales.to_dict(),
                "measured_over_predicted": round(self.measured_over_predicted, 4),
                "saved_to": self.saved_to}

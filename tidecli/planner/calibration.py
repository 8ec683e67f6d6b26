"""Calibration of the cost model on real steps: what a run measured, the corrections fitted to
it, the plan solved again with them, and the file the corrections are saved in.

Microbenchmarks miss launch overheads, cache effects and contention, and auto-pickers that trust
them alone can choose a mode many times slower than the right one. So a plan is run for a couple
of blocks (runtime/calibrate.py does that), the runtime's counters and step time are compared
with what the model predicts *for the same routing*, a correction per term is fitted, and the
plan is solved again with the recorded trace and the corrections. Streamed misses are read
inside the step, so no counter times them: their cost stays the profile's per-expert copy time
(why: docs/benchmarks.md, section 4). The corrections are saved per machine profile, model and
miss mode; the plan the runtime follows by default applies them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tidecli.errors import TideError
from tidecli.fsutil import atomic_write_json, config_dir
from tidecli.hardware import probe
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import ModelConfig
from tidecli.planner.costs import Calibration
from tidecli.planner.model import Breakdown
from tidecli.planner.plan import Plan
from tidecli.planner.report import CalibrationReport, Measurement
from tidecli.planner.solver import make_plan, predictor
from tidecli.planner.workload import Workload
from tidecli.units import GIB

# guards against a zero or absurd ratio only: a CPU device checked against a GPU profile
# legitimately needs scales in the hundreds
SCALE_RANGE = (1e-3, 1e4)
MAX_LAUNCH_MS = 1e4  # per layer: beyond any plausible fixed cost
OFF_BY = 2.0  # warn when the uncalibrated prediction is off by more than this factor
CALIBRATION_SCHEMA = "tide-calibration/1"


def _ratio(measured: float, predicted: float) -> float:
    if predicted <= 1e-6 or measured <= 0:
        return 1.0  # nothing to compare: keep the profile's figure
    lo, hi = SCALE_RANGE
    return min(hi, max(lo, measured / predicted))


def _solve_increasing(fn: Callable[[float], float], target: float, lo: float,
                      hi: float) -> float:
    """x in [lo, hi] with fn(x) = target for a non-decreasing fn (clamped at the ends)."""
    if fn(lo) >= target:
        return lo
    if fn(hi) <= target:
        return hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return (lo + hi) / 2


def fit_calibration(*, predictor: Callable[[Calibration], Breakdown],
                    measured: Measurement) -> Calibration:
    """The CPU and PCIe scales come straight from the runtime's counters: cpu_ms against the
    model's CPU misses for the same routing, and the copies' time per expert copied (copy_ms
    over the experts moved) against the profile's. Per expert, because the runtime and the
    model may move different experts for the same routing: with gpu misses the runtime keeps
    an expert it read into a scratch slot, where the model counts a promotion besides; a ratio
    of totals then read as a faster link. Streamed reads are not timed, so their scale stays 1.
    What remains of the measured step is put on the fixed per-layer cost (launches, host syncs,
    Python: what bandwidth microbenchmarks miss), solved so that the model gives the measured
    step time; only if the model is too slow even with no fixed cost are the device's bandwidth
    terms scaled down. The step time is non-decreasing in both, so a bisection finds them. The
    runtime's stall_ms is not used: it does not count the GPU idling during CPU misses."""
    base = predictor(Calibration(overlap=measured.overlap))
    cpu = _ratio(measured.cpu_ms, base.cpu_miss_ms)
    io = _ratio(measured.copy_ms / measured.reads, base.io_expert_ms) if measured.reads > 0 \
        else 1.0

    def with_launch(ms: float) -> Calibration:
        return Calibration(cpu_scale=cpu, io_scale=io, launch_ms_per_layer=ms,
                           overlap=measured.overlap)

    target = measured.step_ms
    launch = _solve_increasing(lambda ms: predictor(with_launch(ms)).step_ms, target, 0.0,
                               MAX_LAUNCH_MS)
    if launch > 0:
        return with_launch(launch)
    lo, _hi = SCALE_RANGE
    gpu = _solve_increasing(
        lambda g: predictor(Calibration(gpu_scale=g, cpu_scale=cpu, io_scale=io,
                                        launch_ms_per_layer=0.0,
                                        overlap=measured.overlap)).step_ms, target, lo, 1.0)
    return Calibration(gpu_scale=gpu, cpu_scale=cpu, io_scale=io, launch_ms_per_layer=0.0,
                       overlap=measured.overlap)


def calibrated_plan(*, measured: Measurement, model_path: str | Path, config: ModelConfig,
                    profile: HardwareProfile, plan: Plan, workload: Workload,
                    ram_gib: float | None = None) -> Plan:
    """Fit the corrections to `measured` (a run of `plan`), save them for this machine and
    model, and return the plan solved again with the run's routing and the corrections; its
    `calibration` holds predicted against measured."""
    m = measured
    model = predictor(plan=plan, config=config, profile=profile, trace=m.trace)
    with_trace = model(Calibration(overlap=m.overlap))
    cal = fit_calibration(predictor=model, measured=m)
    new = make_plan(config=config, profile=profile, vram_gib=plan.vram_budget_bytes / GIB,
                    workload=replace(workload, tokens_per_step=None), trace=m.trace,
                    ram_gib=ram_gib, calibration=cal, model_name=plan.model, misses=plan.misses,
                    experts_format=plan.experts_format)
    warnings = list(new.warnings)
    off = m.step_ms / plan.predicted_step_ms if plan.predicted_step_ms > 0 else 1.0
    if off > OFF_BY or off < 1 / OFF_BY:
        warnings.append(f"the profile-only prediction was off ×{off:.2f} on real steps "
                        f"({plan.predicted_step_ms:.1f} ms predicted, {m.step_ms:.1f} ms "
                        "measured); the calibrated plan corrects for it")
    if profile.kind == "reference":
        warnings.append(f"calibrated on this machine ({m.device}) with the reference profile "
                        f"{profile.name!r}: the corrections describe this machine")
    report = CalibrationReport(
        measured=m, measured_plan={"experts_per_layer": {str(k): v for k, v in
                                                         plan.experts_per_layer.items()},
                                   "tau": plan.tau, "cpu_threads": plan.cpu_threads,
                                   "misses": plan.misses},
        profile_only=plan.breakdown, with_trace=with_trace, calibrated=model(cal), scales=cal,
        measured_over_predicted=off)
    path = save_calibration(profile=profile, model=model_path, misses=plan.misses,
                            calibration=cal, report=report, compiled=m.compiled)
    return replace(new, warnings=tuple(warnings), calibration=replace(report,
                                                                      saved_to=str(path)))


# ---- saved corrections --------------------------------------------------------------------------


def calibration_path(*, profile: HardwareProfile, model: str | Path, misses: str,
                     compiled: bool = False) -> Path:
    """Where the corrections for this profile (machine), model folder, miss mode and kind of
    step (eager, or compiled: fewer kernels, a smaller fixed cost per layer) live."""
    folder = Path(model).expanduser().resolve()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    name = f"{probe.slug(profile.name)}--{probe.slug(folder.name)}-{digest}--{misses}" + \
        ("--compiled" if compiled else "") + ".json"
    return config_dir() / "calibrations" / name


def save_calibration(*, profile: HardwareProfile, model: str | Path, misses: str,
                     calibration: Calibration, report: CalibrationReport | None = None,
                     compiled: bool = False) -> Path:
    path = calibration_path(profile=profile, model=model, misses=misses, compiled=compiled)
    return atomic_write_json(path, make_parents=True, obj={
        "schema": CALIBRATION_SCHEMA, "profile": profile.name,
        "model": str(Path(model).expanduser().resolve()), "misses": misses,
        "compiled": compiled,
        "created": datetime.date.today().isoformat(), "scales": calibration.to_dict(),
        "measured": report.to_dict() if report else {}})


def load_calibration(*, profile: HardwareProfile, model: str | Path, misses: str,
                     compiled: bool = False) -> Calibration | None:
    """The corrections `tide plan --calibrate` saved for this profile, model, miss mode and
    kind of step, or None; an unreadable file is a one-line error."""
    path = calibration_path(profile=profile, model=model, misses=misses, compiled=compiled)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        sc = raw["scales"]
        launch = sc.get("launch_ms_per_layer")
        return Calibration(gpu_scale=float(sc["gpu_scale"]), cpu_scale=float(sc["cpu_scale"]),
                           io_scale=float(sc["io_scale"]),
                           launch_ms_per_layer=None if launch is None else float(launch),
                           overlap=bool(sc.get("overlap", True)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TideError(f"the saved calibration {path} cannot be read ({exc.__class__.__name__})",
                        "delete it, or run `tide plan --calibrate` again") from exc

"""`tide plan --calibrate`: check a plan on real denoising steps and correct the model.

Microbenchmarks miss launch overheads, cache effects and contention, and auto-pickers that trust
them alone can choose a mode many times slower than the right one. So: run the plan (policy
tide, its B_ℓ and τ) for a couple of blocks on a fixed prompt with the routing trace on, compare
the measured step time and the runtime's counters (cpu_ms, copy_ms) with what the model
predicts *for the same routing*, fit a correction per term, and re-solve with the recorded
trace and the corrections. The engine (and torch) is imported inside the functions only.

Streamed misses are read inside the step, so no counter times them: their cost stays the
profile's per-expert copy time (PCIe scale 1), and the counters' experts read per step are
shown beside the model's. Timing them from a second run with fewer slots was tried and dropped:
on the H200 (2026-11-29, `tide plan --calibrate` on synthetic mini, docs/benchmarks.md section 4)
the slope between two short runs moved from 0.07 to 0.14 ms per read between runs and with
the size of the step away (a read costs less when a layer reads many at once), while the
profile's figure, 0.138 ms, matched the run nearest the plan. The corrections are saved for
this machine and model; the plan the runtime follows by default (planner/auto.py) applies them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tidecli.errors import TideError
from tidecli.experts.budget import GIB
from tidecli.experts.trace import RoutingTrace
from tidecli.fsutil import atomic_write_json, config_dir
from tidecli.hardware import probe
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import ModelConfig
from tidecli.planner.costs import Calibration
from tidecli.planner.model import Breakdown
from tidecli.planner.plan import Plan
from tidecli.planner.solver import make_plan, predictor
from tidecli.planner.workload import Workload

CALIBRATION_PROMPT = ("Write a Python function that returns the n-th Fibonacci number, "
                      "then explain how it works.")
# guards against a zero or absurd ratio only: a CPU device checked against a GPU profile
# legitimately needs scales in the hundreds
SCALE_RANGE = (1e-3, 1e4)
MAX_LAUNCH_MS = 1e4  # per layer: beyond any plausible fixed cost
OFF_BY = 2.0  # warn when the uncalibrated prediction is off by more than this factor
CALIBRATION_SCHEMA = "tide-calibration/1"


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

    def to_dict(self) -> dict:
        return {"device": self.device, "steps": self.steps, "step_ms": round(self.step_ms, 4),
                "cpu_ms": round(self.cpu_ms, 4), "copy_ms": round(self.copy_ms, 4),
                "stall_ms": round(self.stall_ms, 4), "hit_rate": round(self.hit_rate, 4),
                "reads_per_step": round(self.reads, 3)}


def measure(*, model_path: str | Path, plan: Plan, device: str = "auto", blocks: int = 2,
            threshold: float = 0.95, cpu_threads: int | None = None,
            prompt: str = CALIBRATION_PROMPT,
            progress: Callable[[str, int, int], None] | None = None) -> Measurement:
    """Run `plan` for `blocks` blocks of real denoising steps and average what the runtime saw."""
    import torch

    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.engine import Engine, EngineOptions

    opts = EngineOptions(
        model=str(model_path), device=device, policy="tide", block_length=plan.block_length,
        experts_per_layer_map=dict(plan.experts_per_layer), tau=plan.tau,
        cpu_threads=plan.cpu_threads if cpu_threads is None else cpu_threads,
        cpu_mode=plan.cpu_mode, context_tokens=plan.context_tokens,
        ram_gib=plan.ram_budget_bytes / GIB if plan.tiered else None,
        ram_experts_map=dict(plan.experts_in_ram) if plan.tiered else None,
        staging_experts=plan.staging_experts if plan.tiered else None, misses=plan.misses)
    try:
        engine = Engine(opts, progress=progress, quiet=True)
    except torch.OutOfMemoryError as exc:
        raise TideError("the plan's expert slots do not fit this GPU's free memory",
                        "calibrate with this machine's profile (omit --profile) or a lower --vram"
                        ) from exc
    settings = DecodeSettings(gen_length=blocks * plan.block_length,
                              block_length=plan.block_length, threshold=threshold)
    try:
        ids = engine.prompt_ids(prompt)
        trace = engine.runtime.enable_trace()
        mean = _run_steps(engine, ids, settings)
        dev = engine.device
    finally:
        engine.close()
    return Measurement(device=str(dev), overlap=dev.type == "cuda", steps=int(mean[6]),
                       step_ms=mean[0], cpu_ms=mean[1], copy_ms=mean[2], stall_ms=mean[3],
                       hit_rate=mean[4], trace=trace, reads=mean[5])


def _run_steps(engine, ids: list[int], settings) -> list[float]:
    """Decode once; the means per steady step of (step ms, cpu ms, copy ms, stall ms, hit rate,
    experts moved), then the number of steps."""
    engine.runtime.reset_stats()
    rt = engine.runtime
    expert = getattr(rt, "expert_bytes", 0) or getattr(getattr(rt, "pools", None),
                                                          "expert_bytes", 0)
    rows: list[tuple[float, ...]] = []
    for ev in engine.decoder(ids, settings).steps():
        if ev.global_step == 1:  # a cold pool is filled before computing: not steady state
            continue
        s = ev.expert_stats or {}
        moved = float(s.get("bytes_h2d", 0)) / expert if expert else 0.0
        rows.append((ev.forward_ms, float(s.get("cpu_ms", 0.0)), float(s.get("copy_ms", 0.0)),
                     float(s.get("stall_ms", 0.0)), float(s.get("hit_rate", 1.0)), moved))
    if not rows:
        raise TideError("calibration ran no steady denoising step",
                        "try again; the prompt ended after its first step")
    n = len(rows)
    return [sum(r[i] for r in rows) / n for i in range(6)] + [float(n)]


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
    """The CPU and PCIe scales come straight from the runtime's counters (cpu_ms, copy_ms
    against the model's CPU misses and copies for the same routing; streamed reads are not
    timed, so their scale stays 1). What remains of the
    measured step is put on the fixed per-layer cost (launches, host syncs, Python: what
    bandwidth microbenchmarks miss), solved so that the model gives the measured step time;
    only if the model is too slow even with no fixed cost are the device's bandwidth terms
    scaled down. The step time is non-decreasing in both, so a bisection finds them. The
    runtime's stall_ms is not used: it does not count the GPU idling during CPU misses."""
    base = predictor(Calibration(overlap=measured.overlap))
    cpu = _ratio(measured.cpu_ms, base.cpu_miss_ms)
    io = _ratio(measured.copy_ms, base.pcie_ms)

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


def calibrate_plan(*, model_path: str | Path, config: ModelConfig, profile: HardwareProfile,
                   plan: Plan, workload: Workload, ram_gib: float | None = None,
                   device: str = "auto", cpu_threads: int | None = None, blocks: int = 2,
                   progress: Callable[[str, int, int], None] | None = None) -> Plan:
    """Measure `plan`, fit the corrections, and return the plan re-solved with the recorded
    trace and the corrections; its `calibration` field holds predicted vs measured."""
    m = measure(model_path=model_path, plan=plan, device=device, blocks=blocks,
                threshold=workload.threshold, cpu_threads=cpu_threads, progress=progress)
    model = predictor(plan=plan, config=config, profile=profile, trace=m.trace)
    with_trace = model(Calibration(overlap=m.overlap))
    cal = fit_calibration(predictor=model, measured=m)
    after = model(cal)
    new = make_plan(config=config, profile=profile, vram_gib=plan.vram_budget_bytes / GIB,
                    workload=replace(workload, tokens_per_step=None), trace=m.trace,
                    ram_gib=ram_gib, calibration=cal, model_name=plan.model, misses=plan.misses)
    warnings = list(new.warnings)
    off = m.step_ms / plan.predicted_step_ms if plan.predicted_step_ms > 0 else 1.0
    if off > OFF_BY or off < 1 / OFF_BY:
        warnings.append(f"the profile-only prediction was off ×{off:.2f} on real steps "
                        f"({plan.predicted_step_ms:.1f} ms predicted, {m.step_ms:.1f} ms "
                        "measured); the calibrated plan corrects for it")
    if profile.kind == "reference":
        warnings.append(f"calibrated on this machine ({m.device}) with the reference profile "
                        f"{profile.name!r}: the corrections describe this machine")
    info = {
        "measured": m.to_dict(),
        "measured_plan": {"experts_per_layer": {str(k): v for k, v in
                                                plan.experts_per_layer.items()},
                          "tau": plan.tau, "cpu_threads": plan.cpu_threads,
                          "misses": plan.misses},
        "predicted_profile_only": plan.breakdown.to_dict(),
        "predicted_with_trace": with_trace.to_dict(),
        "predicted_calibrated": after.to_dict(),
        "scales": cal.to_dict(),
        "measured_over_predicted": round(off, 4),
    }
    info["saved_to"] = str(save_calibration(profile=profile, model=model_path,
                                            misses=plan.misses, calibration=cal, info=info))
    return replace(new, warnings=tuple(warnings)).with_calibration(info)


# ---- saved corrections --------------------------------------------------------------------------


def calibration_path(*, profile: HardwareProfile, model: str | Path, misses: str) -> Path:
    """Where the corrections for this profile (machine), model folder and miss mode live."""
    folder = Path(model).expanduser().resolve()
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    name = f"{probe.slug(profile.name)}--{probe.slug(folder.name)}-{digest}--{misses}.json"
    return config_dir() / "calibrations" / name


def save_calibration(*, profile: HardwareProfile, model: str | Path, misses: str,
                     calibration: Calibration, info: dict | None = None) -> Path:
    path = calibration_path(profile=profile, model=model, misses=misses)
    return atomic_write_json(path, {"schema": CALIBRATION_SCHEMA, "profile": profile.name,
                                    "model": str(Path(model).expanduser().resolve()),
                                    "misses": misses, "created": datetime.date.today().isoformat(),
                                    "scales": calibration.to_dict(), "measured": info or {}})


def load_calibration(*, profile: HardwareProfile, model: str | Path,
                     misses: str) -> Calibration | None:
    """The corrections `tide plan --calibrate` saved for this profile, model and miss mode, or
    None; an unreadable file is a one-line error."""
    path = calibration_path(profile=profile, model=model, misses=misses)
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

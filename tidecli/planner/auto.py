"""The plan the runtime follows by default (`--policy tide` without `--tau` or expert budgets),
as a pure function of the model, a hardware profile, facts the runtime measured on this machine,
the workload and the saved corrections."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tidecli.experts.modes import MissMode
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import ModelConfig
from tidecli.planner.costs import Calibration
from tidecli.planner.plan import Plan
from tidecli.planner.solver import make_plan
from tidecli.planner.workload import Workload
from tidecli.units import GIB


@dataclass(frozen=True)
class MachineFacts:
    """What the runtime knows about this machine and run before any weight is read."""

    cuda: bool  # the model runs on a CUDA device
    vram_gib: float  # device memory for tide's allocations (--vram, else what is free)
    ram_bytes: int  # host RAM for the expert store (--ram, else what is available)
    stream_blocker: str | None  # why misses cannot be streamed here (None: they can)
    dtype_bytes: int  # bytes of a weight on the device
    misses: MissMode = MissMode.AUTO  # what the user asked for
    experts_format: str = "bf16"  # the routed experts' format (experts/formats.py)
    cpu_threads: int = 0  # --cpu-threads (0: the plan's)
    usable_cpus: int | None = None  # the CPUs this process may run on


def runtime_plan(*, config: ModelConfig, profile: HardwareProfile, facts: MachineFacts,
                 workload: Workload, calibration: Calibration | None = None,
                 model_name: str = "") -> Plan:
    """Plan for these facts: misses resolved as the runtime will run them, the scratch slots
    and the disk tier accounted for as the runtime will build them; CPU misses planned with the
    threads the runtime will use."""
    return make_plan(config=config, profile=profile, vram_gib=facts.vram_gib, workload=workload,
                     ram_gib=facts.ram_bytes / GIB, calibration=calibration,
                     model_name=model_name, misses=facts.misses, dtype_bytes=facts.dtype_bytes,
                     stream_blocker=facts.stream_blocker, cuda=facts.cuda,
                     experts_format=facts.experts_format,
                     cpu_threads=facts.cpu_threads or None, max_cpu_threads=facts.usable_cpus)


# Where `--misses auto` may leave streaming: host-driven modes whose prediction a calibration on
# this machine has checked (uncalibrated, they measured 1.2-4x their prediction on an H200:
# docs/benchmarks.md, sections 11 and 17). Not split: its step follows how the runtime happens to
# share misses between the CPU and the GPU, and measured 15-23 ms where gpu measured 14-16
# (section 19).
AUTO_CANDIDATES = (MissMode.CPU, MissMode.GPU)
AUTO_MARGIN = 0.10  # leave streaming (exact, one device program) only for a clear gain


def auto_misses(stream: Plan, calibrated_plan: Callable[[MissMode], Plan | None]
                ) -> tuple[Plan, str | None]:
    """`--misses auto` on a GPU that can stream: the streamed plan, unless a candidate mode with
    a saved calibration (`calibrated_plan` returns its plan, None when there is none) is
    predicted faster by more than AUTO_MARGIN. Returns the plan and, when it is not streamed,
    the line that tells the user why."""
    best: Plan | None = None
    for mode in AUTO_CANDIDATES:
        plan = calibrated_plan(mode)
        if plan is not None and (best is None or plan.predicted_step_ms < best.predicted_step_ms):
            best = plan
    if best is None or best.predicted_step_ms >= stream.predicted_step_ms * (1 - AUTO_MARGIN):
        return stream, None
    stream_how = "calibrated" if "calibration" in stream.constants else "uncalibrated"
    why = (f"--misses auto runs {best.misses} misses: calibrated on this machine, they are "
           f"predicted at {best.predicted_step_ms:.3g} ms a step against "
           f"{stream.predicted_step_ms:.3g} streamed ({stream_how})")
    if best.misses == MissMode.CPU:
        why += "; CPU experts round differently, so tokens may differ from the resident run's " \
               "(--misses stream keeps them)"
    return best, why


def plan_as_run(resolved: MissMode, *, requested: MissMode,
                build: Callable[[MissMode, Calibration | None], Plan],
                saved: Callable[[MissMode], Calibration | None]) -> tuple[Plan, str | None]:
    """The plan a run follows, for `tide plan` and the engine alike: the `resolved` miss mode
    planned with this machine's saved corrections (`saved`: a mode's calibration, or None), and
    under `--misses auto` where misses stream, a calibrated candidate predicted clearly faster
    instead (`auto_misses`). `build(mode, calibration)` makes a plan. Returns the plan and why
    it left streaming (None when it did not)."""
    chosen = build(resolved, saved(resolved))
    if requested is not MissMode.AUTO or resolved is not MissMode.STREAM:
        return chosen, None

    def candidate(mode: MissMode) -> Plan | None:
        calibration = saved(mode)
        return None if calibration is None else build(mode, calibration)

    return auto_misses(chosen, candidate)


def calibration_hint(stream: Plan, uncalibrated: dict[str, Plan]) -> str | None:
    """For `tide plan --misses auto`: a line when a candidate mode with no calibration on this
    machine is predicted clearly faster than streaming: the command that checks it, after which
    `auto` runs it if the calibration agrees. None when no such mode."""
    faster = {m: p for m, p in uncalibrated.items()
              if p.predicted_step_ms < stream.predicted_step_ms * (1 - AUTO_MARGIN)}
    if not faster:
        return None
    mode, plan = min(faster.items(), key=lambda mp: mp[1].predicted_step_ms)
    return (f"{mode} misses are predicted {stream.predicted_step_ms / plan.predicted_step_ms:.1f}× "
            f"as fast as streaming here, uncalibrated (host-driven steps measured 1.2-4× their "
            f"prediction on an H200): `tide plan --calibrate --misses {mode}` measures them on "
            f"this machine, and `--misses auto` then runs them if the calibration agrees")

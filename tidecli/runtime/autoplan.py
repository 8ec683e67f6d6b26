"""The plan an engine follows when it is not told how: `--policy tide` without `--tau` or expert
budgets plans, before any weight is read, with this machine's hardware profile (measured once,
quick, when there is none), the machine's facts (runtime/facts.py) and the calibration
`tide plan --calibrate` saved for this model on this machine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tidecli.experts.modes import MissMode, parse_misses, resolve_misses
from tidecli.experts.trace import RoutingTrace
from tidecli.hardware.profile import HardwareProfile
from tidecli.hardware.store import load_or_create_profile, resolve_profile, saved_profile_path
from tidecli.model.config import ModelConfig
from tidecli.planner.auto import MachineFacts, plan_as_run, runtime_plan
from tidecli.planner.calibration import load_calibration
from tidecli.planner.costs import Calibration
from tidecli.planner.model import Breakdown
from tidecli.planner.plan import Plan
from tidecli.planner.solver import predictor
from tidecli.runtime.options import EngineOptions

Progress = Callable[[str, int, int], None]


def follows_plan(opts: EngineOptions, *, cuda: bool) -> bool:
    """Does an engine with these options follow the planner? tide without --tau, expert
    budgets or a given plan; on a CPU device only with an explicit --profile (there is no GPU
    to plan for)."""
    r = opts.residency
    if r.policy != "tide" or r.tide.tau is not None or opts.budgets.experts_per_layer is not None \
            or opts.plan is not None:
        return False
    return cuda or r.profile is not None


def runs_compiled(opts: EngineOptions, *, cuda: bool) -> bool:
    """Do the engine's steps run compiled (`--compile on` where it can run, model/parts.py)?
    Their saved corrections are their own: a compiled step has a smaller fixed cost."""
    if opts.load.compile != "on" or not cuda:
        return False
    import torch

    from tidecli.runtime.devices import compile_missing

    return compile_missing(torch.device("cuda")) is None


def machine_profile(spec: str | None, *, notices: list[str] | None = None,
                    progress: Progress | None = None) -> HardwareProfile:
    """`spec` (a reference name or a file) when given; else this machine's saved profile,
    measured (quick) and saved first when there is none, with a notice saying so."""
    if spec is not None:
        return resolve_profile(spec)
    said: list[str] = []
    prof = load_or_create_profile(announce=said.append, progress=progress)
    if said and notices is not None:
        path = saved_profile_path(prof.gpu_name, detect=False)
        notices.append(f"no hardware profile for this machine yet: measured a quick one and saved "
                       f"it to {path} (`tide profile` measures a full one)")
    return prof


def plan_for(config: ModelConfig, opts: EngineOptions, facts: MachineFacts, *, model: Path,
             notices: list[str]) -> Plan:
    """The plan for this model, options and machine, with this machine's saved corrections.
    With `--misses auto` where misses can stream, a mode calibrated on this machine and
    predicted clearly faster is planned instead (planner/auto.py), and a notice says so; the
    runtime runs the plan's mode (runtime/build.py)."""
    profile = machine_profile(opts.residency.profile, notices=notices)
    mode = resolve_misses(facts.misses, cuda=facts.cuda, stream_blocker=facts.stream_blocker)
    compiled = runs_compiled(opts, cuda=facts.cuda)
    workload = replace(opts.workload, compiled=compiled)

    def saved(m: MissMode) -> Calibration | None:
        return load_calibration(profile=profile, model=model, misses=str(m), compiled=compiled)

    def build(m: MissMode, calibration: Calibration | None) -> Plan:
        m_facts = facts if m is mode else replace(facts, misses=m)
        return runtime_plan(config=config, profile=profile, facts=m_facts, workload=workload,
                            calibration=calibration, model_name=str(model))

    chosen, why = plan_as_run(mode, requested=parse_misses(facts.misses), build=build,
                              saved=saved)
    if why:
        notices.append(why)
    return chosen


def predicted_with_trace(config: ModelConfig, opts: EngineOptions, plan: Plan,
                         trace: RoutingTrace, *, model: Path) -> Breakdown:
    """The plan's predicted step (its parts, ms) with the routing statistics of `trace` (the
    run's own) in place of the published ones: same profile, calibration, B_ℓ and τ. Against
    the measured step it shows the cost model's error alone, the routing statistics' taken out."""
    profile = machine_profile(opts.residency.profile)
    calibration = load_calibration(profile=profile, model=model, misses=plan.misses,
                                   compiled=runs_compiled(opts, cuda=True))
    return predictor(plan=plan, config=config, profile=profile, trace=trace)(calibration)

"""The plan the runtime follows by default: `--policy tide` without `--tau` or expert budgets.

The engine asks for it before loading any weight. It plans with this machine's saved hardware
profile (measured once, quick, when there is none), the engine's own VRAM and RAM budgets, and
where the engine will put missed experts (streamed or on the host), then applies the calibration
`tide plan --calibrate` saved for this model on this machine, if any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tidecli.experts.budget import GIB
from tidecli.hardware.profile import HardwareProfile
from tidecli.planner.plan import Plan

Progress = Callable[[str, int, int], None]


def follows_plan(opts: Any, *, cuda: bool) -> bool:
    """Does an engine with these options follow the planner? tide without --tau or expert
    budgets; on a CPU device only with an explicit --profile (there is no GPU to plan for)."""
    if opts.policy != "tide" or opts.tau is not None or opts.experts_per_layer is not None or \
            opts.experts_per_layer_map is not None:
        return False
    return cuda or opts.profile is not None


def machine_profile(spec: str | None, *, notices: list[str] | None = None,
                    progress: Progress | None = None) -> HardwareProfile:
    """`spec` (a reference name or a file) when given; else this machine's saved profile,
    measured (quick) and saved first when there is none, with a notice saying so."""
    from tidecli.hardware.store import load_or_create_profile, resolve_profile, saved_profile_path

    if spec is not None:
        return resolve_profile(spec)
    said: list[str] = []
    prof = load_or_create_profile(announce=said.append, progress=progress)
    if said and notices is not None:
        path = saved_profile_path(prof.gpu_name, detect=False)
        notices.append(f"no hardware profile for this machine yet: measured a quick one and saved "
                       f"it to {path} (`tide profile` measures a full one)")
    return prof


def runtime_plan(engine: Any) -> Plan:
    """The plan for `engine`'s model, options and device (see the module docstring)."""
    from tidecli.planner.calibrate import load_calibration
    from tidecli.planner.solver import make_plan
    from tidecli.planner.workload import Workload

    o, cfg = engine.opts, engine.cfg
    profile = machine_profile(o.profile, notices=engine.notices)
    cuda = engine.device.type == "cuda"
    stream = o.misses == "stream" or (o.misses == "auto" and cuda and engine._may_stream())
    vram = o.vram_gib if o.vram_gib is not None else engine._device_free_gib()
    size = engine.dtype.itemsize
    if cuda and not stream and o.misses in ("auto", "split", "gpu"):  # scratch slots come first
        vram -= engine.SCRATCH_SLOTS * cfg.expert_bytes(size) / GIB
    ram = engine._ram_budget() / GIB
    workload = Workload(block_length=o.block_length, threshold=o.threshold,
                        context_tokens=o.context_tokens)
    misses = "stream" if stream else "cpu"
    calibration = load_calibration(profile=profile, model=engine.path, misses=misses)
    return make_plan(config=cfg, profile=profile, vram_gib=vram, workload=workload,
                     ram_gib=ram, calibration=calibration, model_name=str(engine.path),
                     misses=misses, dtype_bytes=size)

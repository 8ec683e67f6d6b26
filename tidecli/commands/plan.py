"""`tide plan`: how to run a model on a machine — expert budgets, τ, threads, predicted speed.

A plain plan reads only config.json (for a Hub id, only that file is fetched) and works on any
machine for any profile; `--calibrate` loads the model and runs real steps on this machine.
Imported by cli.py at start-up: nothing heavy at module level.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tidecli.commands.options import (
    BlockLengthOpt,
    DeviceOpt,
    ExpertsDtypeOpt,
    GenLengthOpt,
    MissesOpt,
    ModelOpt,
    ProfileOpt,
    RamOpt,
    ThresholdOpt,
    TracePathOpt,
    VramOpt,
)


def plan(
    model: ModelOpt = None,
    profile: ProfileOpt = None,
    vram: VramOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout.")]
    = False,
    trace: TracePathOpt = None,
    gen_length: GenLengthOpt = 512,
    block_length: BlockLengthOpt = 32,
    threshold: ThresholdOpt = 0.95,
    context: Annotated[int, typer.Option(help="Tokens of KV cache to reserve on the GPU.")]
    = 4096,
    ram: RamOpt = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Run the plan on real denoising steps on this machine, correct the "
                            "cost model and plan again.")] = False,
    device: DeviceOpt = "auto",
    misses: MissesOpt = "auto",
    experts_dtype: ExpertsDtypeOpt = "bf16",
) -> None:
    """Plan expert offload for a model on a GPU: budgets, τ, CPU threads, predicted speed.

    A plain plan reads only config.json (for a Hub id, only that file is fetched) and works on
    any machine for any profile; --calibrate loads the model and runs real steps here.
    """
    run_plan(model=model, profile=profile, vram=vram, json_out=json_out, trace=trace,
             gen_length=gen_length, block_length=block_length, threshold=threshold,
             context=context, ram=ram, calibrate=calibrate, device=device, misses=misses,
             experts_dtype=experts_dtype)


def run_plan(*, model: str | None, profile: str | None, vram: float | None, json_out: bool,
             trace: Path | None, gen_length: int, block_length: int, threshold: float,
             context: int, ram: float | None, calibrate: bool, device: str,
             misses: str = "auto", experts_dtype: str = "bf16") -> None:
    from tidecli.experts.formats import parse_format
    from tidecli.experts.modes import parse_misses
    from tidecli.experts.trace import RoutingTrace
    from tidecli.hardware.store import resolve_profile
    from tidecli.model.config import load_config
    from tidecli.model.resolve import config_folder, resolve_model
    from tidecli.planner import Workload, make_plan
    from tidecli.planner.calibration import load_calibration
    from tidecli.ui.plan_view import render_plan

    mode = parse_misses(misses)
    fmt = parse_format(experts_dtype)
    if calibrate:
        folder, name = resolve_model(model), model or str(resolve_model(model))
    else:
        folder, name = config_folder(model)
    cfg = load_config(folder)
    prof = resolve_profile(profile)
    workload = Workload(block_length=block_length, gen_length=gen_length, threshold=threshold,
                        context_tokens=context)
    routing = RoutingTrace.load(trace) if trace is not None else None
    plan = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload, trace=routing,
                     ram_gib=ram, model_name=name, misses=mode, experts_format=fmt)
    if not calibrate:  # what the runtime would follow: with this machine's saved corrections
        saved = load_calibration(profile=prof, model=folder, misses=plan.misses)
        if saved is not None:
            plan = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload,
                             trace=routing, ram_gib=ram, model_name=name, misses=plan.misses,
                             calibration=saved, experts_format=fmt)
    if calibrate:
        from tidecli.runtime.calibrate import calibrate_plan
        from tidecli.ui.console import byte_progress, err

        err.print(f"calibrating: {plan.policy}, τ {plan.tau}, "
                  f"{sum(plan.experts_per_layer.values())} expert slots on this machine …")
        with byte_progress() as progress:
            plan = calibrate_plan(model_path=folder, config=cfg, profile=prof, plan=plan,
                                  workload=workload, ram_gib=ram, device=device,
                                  progress=progress)
    render_plan(plan)
    if json_out:
        sys.stdout.write(json.dumps(plan.to_dict()) + "\n")
        sys.stdout.flush()

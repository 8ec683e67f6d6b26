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
    RamOpt,
    ThresholdOpt,
    TracePathOpt,
    gib_list,
)
from tidecli.errors import TideError
from tidecli.fsutil import check_writable


def plan(
    model: ModelOpt = None,
    profile: Annotated[str | None, typer.Option(
        "--profile", "-p", metavar="NAME|FILE[,…]",
        help="Hardware profiles to plan with: reference names (e.g. rtx4070,rtx4090: "
             "`tide profile --list`) or profile JSONs, compared side by side. Default: this "
             "machine's saved profile (`tide profile` measures it).")] = None,
    vram: Annotated[str | None, typer.Option(
        metavar="GIB[,…]", help="GPU memory budgets in GiB, e.g. 8,12,16 (compared side by "
                                "side). Default: the profile's free VRAM.")] = None,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the plan as JSON on stdout (a list for several).")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the plan's JSON (a list for several) to this file.")]
    = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also the τ cost curve, routing figures and every note.")]
    = False,
    trace: TracePathOpt = None,
    gen_length: GenLengthOpt = 512,
    block_length: BlockLengthOpt = 32,
    threshold: ThresholdOpt = None,
    context: Annotated[int, typer.Option(help="Tokens of KV cache to reserve on the GPU.")]
    = 4096,
    ram: RamOpt = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Run the plan on real denoising steps on this machine, correct the "
                            "cost model and plan again.")] = False,
    device: DeviceOpt = "auto",
    misses: MissesOpt = "auto",
    experts_dtype: ExpertsDtypeOpt = "bf16",
    compile: Annotated[str, typer.Option(
        "--compile", metavar="[off|on]",
        help="The steps the plan is for: on, compiled (`--compile on`: calibrate them, and use "
             "their saved corrections).")] = "off",
) -> None:
    """Plan expert offload for a model on a GPU: budgets, τ, CPU threads, predicted speed.

    A plain plan reads only config.json (for a Hub id, only that file is fetched) and works on
    any machine for any profile; --calibrate loads the model and runs real steps here.
    """
    from tidecli.commands.checks import check_device
    from tidecli.decode.settings import check_schedule
    from tidecli.experts.formats import parse_format
    from tidecli.experts.modes import parse_misses
    from tidecli.memory import check_ram_gib
    from tidecli.runtime.options import parse_compile

    vrams: list[float | None] = list(gib_list(vram)) if vram else [None]
    profiles = [p.strip() for p in profile.split(",") if p.strip()] if profile else [None]
    check_schedule(gen_length=gen_length, block_length=block_length, threshold=threshold)
    if context < 1:
        raise TideError(f"--context must be at least 1, got {context}", "e.g. --context 4096")
    if ram is not None:
        check_ram_gib(ram)
    check_device(device)
    parse_misses(misses)
    experts_dtype = parse_format(experts_dtype)
    if compile == "auto":
        raise TideError("a plan is for compiled steps or eager ones: --compile auto is neither",
                        "use --compile on (chat and serve compile where they can) or off")
    parse_compile(compile, modes=("off", "on"))
    if output is not None:
        output = check_writable(output)  # before any planning, not after it
    if calibrate and len(vrams) * len(profiles) > 1:
        raise TideError("--calibrate checks one plan on this machine",
                        "give one --vram and one --profile with --calibrate")
    run_plan(model=model, profiles=profiles, vrams=vrams, json_out=json_out, output=output,
             verbose=verbose, trace=trace, gen_length=gen_length, block_length=block_length,
             threshold=threshold, context=context, ram=ram, calibrate=calibrate, device=device,
             misses=misses, experts_dtype=experts_dtype, compile=compile)


def _no_gpu(prof) -> TideError:
    return TideError(f"the profile {prof.name!r} has no GPU: a plan predicts a GPU's speed, and "
                     "this profile has no figures for one",
                     "plan for a GPU with --profile NAME (`tide profile --list`), or run "
                     "`tide profile` on the machine with the GPU")


def run_plan(*, model: str | None, profiles: list[str | None], vrams: list[float | None],
             json_out: bool, output: Path | None, verbose: bool, trace: Path | None,
             gen_length: int, block_length: int, threshold: float | None, context: int,
             ram: float | None, calibrate: bool, device: str, misses: str = "auto",
             experts_dtype: str = "bf16", compile: str = "off") -> None:
    from tidecli.experts.modes import parse_misses
    from tidecli.experts.trace import RoutingTrace
    from tidecli.fsutil import atomic_write_text
    from tidecli.hardware.store import resolve_profile
    from tidecli.model.config import load_config
    from tidecli.model.resolve import config_folder, resolve_model
    from tidecli.planner import Workload, make_plan
    from tidecli.planner.calibration import load_calibration
    from tidecli.ui.plan_view import render_plan, render_plans

    mode = parse_misses(misses)
    if calibrate:
        folder, name = resolve_model(model), model or str(resolve_model(model))
    else:
        folder, name = config_folder(model)
    cfg = load_config(folder)
    workload = Workload(block_length=block_length, gen_length=gen_length, threshold=threshold,
                        context_tokens=context, compiled=compile == "on")
    routing = RoutingTrace.load(trace) if trace is not None else None
    plans = []
    for spec in profiles:
        prof = resolve_profile(spec)
        if not prof.gpu_name and not prof.vram_total_bytes:
            raise _no_gpu(prof)
        for vram in vrams:
            plans.append((_label(spec, prof, vram, len(profiles), len(vrams)),
                          _plan_one(cfg=cfg, prof=prof, vram=vram, workload=workload,
                                    routing=routing, ram=ram, name=name, mode=mode,
                                    folder=folder, calibrate=calibrate, device=device,
                                    make_plan=make_plan, load_calibration=load_calibration,
                                    fmt=experts_dtype, compile=compile)))
    if len(plans) == 1:
        render_plan(plans[0][1], verbose=verbose)
        data: object = plans[0][1].to_dict()
    else:
        render_plans(plans, verbose=verbose)
        data = [dict(p.to_dict(), label=label) for label, p in plans]
    if output is not None:
        atomic_write_text(output, json.dumps(data, indent=1) + "\n")
    if json_out:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()


def _label(spec: str | None, prof, vram: float | None, n_profiles: int, n_vrams: int) -> str:
    """A column's heading: the profile (when several) and the budget (when several)."""
    parts = []
    if n_profiles > 1:
        parts.append(spec if spec and "/" not in spec and not spec.endswith(".json")
                     else prof.name)
    if n_vrams > 1 or (n_profiles > 1 and vram is not None):
        parts.append("free VRAM" if vram is None else f"{vram:g} GiB")
    return " · ".join(parts) or prof.name


def _plan_one(*, cfg, prof, vram, workload, routing, ram, name, mode, folder, calibrate,
              device, make_plan, load_calibration, fmt, compile):
    plan = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload, trace=routing,
                     ram_gib=ram, model_name=name, misses=mode, experts_format=fmt)
    if not calibrate:  # what the runtime would follow: with this machine's saved corrections
        import functools
        from dataclasses import replace

        from tidecli.experts.modes import MissMode
        from tidecli.planner.auto import AUTO_CANDIDATES, calibration_hint, plan_as_run

        def build(m, calibration=None):
            return make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload,
                             trace=routing, ram_gib=ram, model_name=name, misses=m,
                             calibration=calibration, experts_format=fmt)

        @functools.cache  # plan_as_run and the hint below both ask; the file is read once
        def saved(m):
            return load_calibration(profile=prof, model=folder, misses=str(m),
                                    compiled=compile == "on")

        resolved = MissMode(plan.misses)
        chosen, why = plan_as_run(resolved, requested=mode, build=build, saved=saved)
        if why is None and mode is MissMode.AUTO and resolved is MissMode.STREAM:
            # which uncalibrated candidate a calibration might make auto run
            why = calibration_hint(chosen, {str(m): build(m) for m in AUTO_CANDIDATES
                                            if saved(m) is None})
        return replace(chosen, notes=(why, *chosen.notes)) if why else chosen
    from tidecli.runtime.calibrate import calibrate_plan
    from tidecli.ui.console import byte_progress, err

    err.print(f"calibrating: {plan.policy}, τ {plan.tau}, "
              f"{sum(plan.experts_per_layer.values())} expert slots on this machine …")
    with byte_progress() as progress:
        return calibrate_plan(model_path=folder, config=cfg, profile=prof, plan=plan,
                              workload=workload, ram_gib=ram, device=device, compile=compile,
                              progress=progress,
                              say=lambda line: err.print(line, style="dim", markup=False))

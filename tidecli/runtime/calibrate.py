"""`tide plan --calibrate`, the half that runs: build an engine that follows a plan exactly, run a
couple of blocks of real denoising steps, and hand what the runtime saw to the planner
(planner/calibration.py fits the corrections and solves again)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tidecli.decode.diffusion import DecodeSettings
from tidecli.errors import TideError
from tidecli.experts.modes import parse_misses
from tidecli.hardware.probe import usable_cores
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import ModelConfig
from tidecli.planner.calibration import Measurement, calibrated_plan
from tidecli.planner.plan import Plan
from tidecli.planner.workload import Workload
from tidecli.runtime.engine import Engine
from tidecli.runtime.options import (
    BudgetOptions,
    EngineOptions,
    LoadOptions,
    ResidencyOptions,
)
from tidecli.units import GIB

CALIBRATION_PROMPT = ("Write a Python function that returns the n-th Fibonacci number, "
                      "then explain how it works.")


@dataclass(frozen=True)
class StepMeans:
    """Means over the steady denoising steps of one run (the first step fills empty slots)."""

    steps: int
    step_ms: float
    cpu_ms: float
    copy_ms: float
    stall_ms: float
    hit_rate: float
    reads: float  # experts moved host → GPU per step


def calibration_threads(plan: Plan, cpu_threads: int | None) -> int:
    """The CPU threads a calibration runs with: those asked for, else the plan's, at most the
    CPUs this process may use (the corrections describe this machine)."""
    if cpu_threads is not None:
        return cpu_threads
    return min(plan.cpu_threads, usable_cores())


def plan_options(model_path: str | Path, plan: Plan, *, device: str,
                 cpu_threads: int | None, compile: str = "off") -> EngineOptions:
    """An engine that follows `plan` exactly (budgets, τ, threads, RAM tiers, misses), its
    steps compiled or not; a plan made with another machine's profile may name more CPU
    threads than this process may use: it gets those it may (`calibration_threads`)."""
    return EngineOptions(
        load=LoadOptions(model=str(model_path), device=device,
                         experts_dtype=plan.experts_format, compile=compile),
        residency=ResidencyOptions(policy="tide", misses=parse_misses(plan.misses),
                                   cpu_threads=calibration_threads(plan, cpu_threads),
                                   cpu_mode=plan.cpu_mode),
        budgets=BudgetOptions(ram_gib=plan.ram_budget_bytes / GIB if plan.tiered else None),
        workload=Workload(block_length=plan.block_length, context_tokens=plan.context_tokens),
        plan=plan)


Say = Callable[[str], None]


def _said_per_block(stage: str, tokens: int, say: Say | None):
    """A StepEvent sink that says a line as each block ends: tokens so far of `tokens`, the
    block's steps and seconds (the first and last blocks may be partial: blocks are aligned to
    absolute positions, the prompt's end included)."""
    last = [0.0]  # the previous block's end (s)

    def see(ev) -> None:
        if say is None or not ev.block_done:
            return
        n = ev.step + 1
        say(f"{stage}: {min(ev.tokens_done, tokens)} of {tokens} tokens ({n} "
            f"step{'s' if n != 1 else ''}, {ev.elapsed_s - last[0]:.1f} s)")
        last[0] = ev.elapsed_s
    return see


def warm_up(engine: Engine, ids: list[int], settings: DecodeSettings,
            say: Say | None = None) -> None:
    """One block of `ids` decoded and discarded, as `tide bench` warms up: a process's first
    forwards pay what no later step pays (kernels loaded, the CPU workers started, staging
    buffers and the allocator grown, step programs captured)."""
    one = replace(settings, gen_length=min(settings.block_length, settings.gen_length))
    see = _said_per_block("warm-up", one.gen_length, say)
    for ev in engine.decoder(ids, one).steps():
        see(ev)


def step_means(engine: Engine, ids: list[int], settings: DecodeSettings,
               say: Say | None = None) -> StepMeans:
    engine.runtime.reset_stats()
    expert = engine.runtime.pools.expert_bytes  # tide: a pooled runtime
    rows: list[tuple[float, ...]] = []
    see = _said_per_block("measuring", settings.gen_length, say)
    for ev in engine.decoder(ids, settings).steps():
        see(ev)
        if ev.global_step == 1:  # a cold pool is filled before computing: not steady state
            continue
        c = ev.experts
        moved = c.bytes_h2d / expert if c is not None and expert else 0.0
        rows.append((ev.forward_ms, c.cpu_ms if c else 0.0, c.copy_ms if c else 0.0,
                     c.stall_ms if c else 0.0, c.hit_rate if c else 1.0, moved))
    if not rows:
        raise TideError("calibration ran no steady denoising step",
                        "try again; the prompt ended after its first step")
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(6)]
    return StepMeans(steps=n, step_ms=mean[0], cpu_ms=mean[1], copy_ms=mean[2],
                     stall_ms=mean[3], hit_rate=mean[4], reads=mean[5])


def measure(*, model_path: str | Path, plan: Plan, device: str = "auto", blocks: int = 2,
            threshold: float | None = None, cpu_threads: int | None = None,
            prompt: str = CALIBRATION_PROMPT, compile: str = "off",
            progress: Callable[[str, int, int], None] | None = None,
            say: Say | None = None) -> Measurement:
    """Run `plan` for `blocks` blocks of real denoising steps, after a block of warm-up, and
    average what the runtime saw. `say` gets a line as each block ends."""
    opts = plan_options(model_path, plan, device=device, cpu_threads=cpu_threads,
                        compile=compile)
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
        warm_up(engine, ids, settings, say)
        trace = engine.runtime.enable_trace()
        m = step_means(engine, ids, settings, say)
        dev, compiled = engine.device, engine.compiled
    finally:
        engine.close()
    return Measurement(device=str(dev), overlap=dev.type == "cuda", steps=m.steps,
                       step_ms=m.step_ms, cpu_ms=m.cpu_ms, copy_ms=m.copy_ms,
                       stall_ms=m.stall_ms, hit_rate=m.hit_rate, trace=trace, reads=m.reads,
                       compiled=compiled)


def calibrate_plan(*, model_path: str | Path, config: ModelConfig, profile: HardwareProfile,
                   plan: Plan, workload: Workload, ram_gib: float | None = None,
                   device: str = "auto", cpu_threads: int | None = None, blocks: int = 2,
                   compile: str = "off",
                   progress: Callable[[str, int, int], None] | None = None,
                   say: Say | None = None) -> Plan:
    """Measure `plan` on this machine; the plan solved again with the fitted corrections (saved
    for this machine, model and kind of step)."""
    m = measure(model_path=model_path, plan=plan, device=device, blocks=blocks,
                threshold=workload.threshold, cpu_threads=cpu_threads, compile=compile,
                progress=progress, say=say)
    new = calibrated_plan(measured=m, model_path=model_path, config=config, profile=profile,
                          plan=plan, workload=workload, ram_gib=ram_gib)
    threads = calibration_threads(plan, cpu_threads)
    if cpu_threads is None and threads < plan.cpu_threads:
        new = replace(new, warnings=(*new.warnings,
                                     f"calibrated with {threads} CPU threads: the plan's "
                                     f"{plan.cpu_threads} are more than this machine has"))
    return new

"""The solver: fit the VRAM budget, choose B_ℓ (uniform or per layer), τ* and threads.

1. Device memory (memory.py's accounting): dense weights + KV cache + workspace must fit
   with at least one slot per MoE layer; what is left is S expert slots.
2. Uniform: B = min(E, ⌊S / L⌋); τ* from the paper's program; predicted step time.
3. With a routing trace (layers differ): an exact allocation of the S slots over layers that
   minimises Σ_ℓ per-layer step cost (dynamic programme, τ fixed), alternated with τ* twice; kept
   only when the full model predicts it at least 1 % faster than uniform.
4. Host RAM (tiers.py): when the routed experts do not fit the RAM budget, a staging ring and
   as many experts per layer as fit stay in RAM (uniform, or split by the trace), the rest on
   disk; misses of disk experts pay a read in the cost model.
5. Block routing (LLaDA2.2): a step uses at most `expert_capacity` experts per layer and routing
   block (the routing statistics are drawn with that bound). When every layer's budget holds a
   step's whole pool, tide loads it at a block's first step and refreshes whenever it shifts
   (experts/policies.py): the plan says τ = 1, which is what that schedule is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from tidecli.decode.settings import check_routing_block
from tidecli.experts.formats import expert_format, ram_hint
from tidecli.experts.modes import SCRATCH_SLOTS, MissMode, resolve_misses
from tidecli.experts.trace import RoutingTrace
from tidecli.hardware.profile import HardwareProfile
from tidecli.memory import device_memory, pool_bytes
from tidecli.model.config import ModelConfig
from tidecli.planner.allocate import allocate_slots
from tidecli.planner.costs import Calibration, disk_gbps, hardware_costs, profile_vram_gib
from tidecli.planner.model import Breakdown, Problem, predict, solve_tau
from tidecli.planner.model import layer_step_costs as _layer_costs
from tidecli.planner.plan import Plan
from tidecli.planner.stats import block_runs, published_stats, trace_stats
from tidecli.planner.tiers import plan_host, ram_budget, split_ram
from tidecli.planner.workload import (
    Workload,
    estimated_tokens_per_step,
    planned_threshold,
    steps_per_block,
)
from tidecli.units import GIB

NON_UNIFORM_GAIN = 0.01  # per-layer budgets must beat uniform by this share to be chosen


def _per_layer_budgets(p: Problem, total: int, tau: int) -> tuple[np.ndarray, int]:
    budgets = allocate_slots(_layer_costs(p, tau), total)
    for _ in range(2):  # B depends on τ and τ* on B: two alternations settle in practice
        new_tau, _c = solve_tau(p, budgets)
        if new_tau == tau:
            break
        tau = new_tau
        budgets = allocate_slots(_layer_costs(p, tau), total)
    return budgets, tau


def _trace_steps_per_block(trace: RoutingTrace) -> float | None:
    tr = trace.steps_only()
    if len(tr) < 2:
        return None
    runs = block_runs(tr)
    return float(np.mean([stop - start for start, stop in runs]))


def _disk_warning(cfg: ModelConfig, host, gbps: float, fmt: str = "bf16") -> str:
    experts = cfg.num_moe_layers * cfg.num_experts
    need = experts * host.expert_bytes
    hint = ram_hint(hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size, experts=experts,
                    budget=host.budget) if fmt == "bf16" else ""
    return (f"the routed experts ({need / GIB:.1f} GiB in {fmt}) do not fit the "
            f"{host.budget / GIB:.1f} GiB of host RAM for experts: {host.disk_experts} of "
            f"{host.disk_experts + host.ram_experts} stay on disk and are read when missed "
            f"(at ~{gbps:g} GB/s): slower, same tokens{hint}")


def make_plan(*, config: ModelConfig, profile: HardwareProfile, vram_gib: float | None = None,
              workload: Workload | None = None, trace: RoutingTrace | None = None,
              ram_gib: float | None = None, calibration: Calibration | None = None,
              model_name: str = "", misses: str | MissMode = MissMode.AUTO,
              dtype_bytes: int = 2, stream_blocker: str | None = None,
              cuda: bool | None = None, experts_format: str = "bf16",
              cpu_threads: int | None = None, max_cpu_threads: int | None = None) -> Plan:
    """Plan TIDE offload of `config` on `profile` within `vram_gib` (default: the profile's free
    VRAM minus the CUDA context's reserve). Raises TideError when the dense part cannot fit.
    `misses` is resolved as the runtime resolves it (experts/modes.py): `auto` streams when the
    profile has a GPU and nothing blocks streaming (`stream_blocker`, or a disk tier), else runs
    them on the CPU; `split` and `gpu` pass through scratch slots (whose memory comes out of
    the budget).
    `cuda`: whether the run is on a GPU (default: whether the profile has one). `dtype_bytes`:
    the size of a weight on the device (2 for bf16; 4 when a CPU device computes in fp32) —
    memory only: the host store and the profile's timings are bf16. `experts_format`: a
    compressed format (experts/formats.py) counts its bytes on the device, in RAM, over PCIe
    and from disk. `cpu_threads`: the threads CPU misses will run with (the profile's row for
    them); `max_cpu_threads`: the CPUs this process may use (the plan picks within them)."""
    cfg, wl = config, workload or Workload()
    wl.validate()
    check_routing_block(block_length=wl.block_length,
                        routing_block=cfg.block_size if cfg.block_routing else 0)
    threshold = planned_threshold(cfg, wl.threshold)
    warnings: list[str] = []
    if vram_gib is None:
        vram_gib = profile_vram_gib(profile)
    elif profile.vram_total_bytes and vram_gib * GIB > profile.vram_total_bytes:
        warnings.append(f"--vram {vram_gib:g} GiB exceeds the {profile.vram_total_bytes / GIB:.1f}"
                        f" GiB of {profile.gpu_name or profile.name}")
    fmt = expert_format(experts_format, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)
    packed = fmt.row_bytes if fmt.compressed else None  # one compressed expert, anywhere
    mem = device_memory(cfg, vram_gib, context_tokens=wl.context_tokens,
                        block_length=wl.block_length, dtype_bytes=dtype_bytes,
                        expert_bytes=packed)
    layers, e, eb = cfg.num_moe_layers, cfg.num_experts, mem.expert_bytes
    budget, dense, kv, work = mem.budget, mem.dense, mem.kv_cache, mem.workspace
    slots = mem.slots

    traced_steps = _trace_steps_per_block(trace) if trace is not None else None
    if wl.tokens_per_step is not None:
        tps, tps_source = wl.tokens_per_step, "given"
    elif traced_steps:
        tps, tps_source = wl.block_length / traced_steps, "trace"
    else:
        tps = estimated_tokens_per_step(cfg, threshold=threshold, block_length=wl.block_length)
        tps_source = "threshold"
    steps = steps_per_block(wl.block_length, tps)
    if trace is not None:
        stats = trace_stats(trace, cfg=cfg, max_age=steps)
        block = trace.meta.get("block_length")
        if block and int(block) != wl.block_length:
            warnings.append(f"the trace was recorded with block length {block}, the plan is for "
                            f"{wl.block_length}")
    else:
        stats = published_stats(cfg, block_length=wl.block_length, max_age=steps)

    ram_bytes, ram_note = ram_budget(cfg, profile, ram_gib)
    host = plan_host(cfg, ram_bytes, expert_bytes=packed)
    # a disk tier only matters when experts live on the host (not when all fit on the GPU)
    tiered = host is not None and host.tiered and min(e, slots // layers) < e
    cuda = bool(profile.gpu_name) if cuda is None else cuda
    mode = resolve_misses(misses, cuda=cuda, stream_blocker=stream_blocker or (
        "it needs every expert in RAM, and some stay on disk" if tiered else None))
    reserved = SCRATCH_SLOTS if cuda and mode.uses_scratch else 0  # out of the same budget
    slots, uniform_b = mem.expert_slots(reserved), mem.uniform_slots(reserved)
    uniform = np.full(layers, uniform_b, dtype=np.int64)
    per_call = float(stats.tokens_per_call[:, uniform_b].mean())
    costs = hardware_costs(cfg=cfg, profile=profile, block_length=wl.block_length,
                           context_tokens=wl.context_tokens, tokens_per_call=per_call,
                           calibration=calibration, expert_bytes=packed,
                           experts_format=fmt.name, compiled=wl.compiled,
                           cpu_threads=cpu_threads,
                           max_cpu_threads=max_cpu_threads)
    ram = np.array([host.ram_per_layer[layer] for layer in cfg.moe_layers]) if tiered else None
    problem = Problem(cfg=cfg, costs=costs, stats=stats, steps=steps, ram=ram, misses=mode)
    tau, tau_costs = solve_tau(problem, uniform)
    budgets, breakdown = uniform, predict(problem, uniform, tau)
    alternatives = {"uniform": breakdown.step_ms}
    if stats.source == "trace" and uniform_b < e:
        per_layer, tau_n = _per_layer_budgets(problem, slots, tau)
        bd_n = predict(problem, per_layer, tau_n)
        alternatives["per_layer"] = bd_n.step_ms
        if bd_n.step_ms < breakdown.step_ms * (1 - NON_UNIFORM_GAIN):
            budgets, breakdown, tau = per_layer, bd_n, tau_n
            tau_costs = solve_tau(problem, budgets)[1]
    pool = cfg.block_pool(wl.block_length)
    follows_pool = bool(pool) and int(budgets.min()) >= pool
    if follows_pool and tau != 1:
        tau, tau_costs = 1, solve_tau(problem, budgets)[1]
        breakdown = predict(problem, budgets, tau)
    assert mem.fixed + pool_bytes(budgets.tolist(), eb) <= budget, "over budget"
    if tiered:
        ram, ram_alts = split_ram(problem, budgets, tau, host)
        alternatives.update(ram_alts)
        problem = Problem(cfg=cfg, costs=costs, stats=stats, steps=steps, ram=ram,
                          misses=mode)
        tau, tau_costs = solve_tau(problem, budgets)
        breakdown = predict(problem, budgets, tau)
        host = replace(host, ram_per_layer={layer: int(r) for layer, r in
                                            zip(cfg.moe_layers, ram.tolist(), strict=True)})

    if wl.gen_length + wl.block_length > wl.context_tokens:  # the engine reserves --context
        warnings.append(f"--gen-length {wl.gen_length} plus a prompt needs more KV cache than "
                        f"--context {wl.context_tokens} reserves: raise --context")
    gbps, disk_note = disk_gbps(profile)
    if tiered:
        warnings.append(_disk_warning(cfg, host, gbps, fmt.name))
    mean_distinct = float(stats.distinct.mean())
    if budgets.min() < 0.5 * mean_distinct and mode is MissMode.CPU:
        warnings.append(f"only {int(budgets.min())} slots per layer for ~{mean_distinct:.0f} "
                        "experts a step uses: most routed pairs run on the CPU")
    notes = list(costs.notes)
    if mode is not MissMode.STREAM and cuda and calibration is None:
        notes.append(f"--misses {mode} is predicted optimistically: on an H200 host-driven steps "
                     "measured 1.2-3.4x this model's prediction (docs/benchmarks.md, section 11); "
                     "`tide plan --calibrate` on the machine corrects it")
    if breakdown.host_ms and not costs.host_layer_measured:
        notes.append(f"each MoE layer's hand-off to the host (--misses {mode}"
                     + (", a disk tier" if tiered else "") + f") assumed "
                     f"{costs.host_ms(str(mode)):g} ms, as an H200 host measured: `tide profile` "
                     "on the machine measures it")
    if wl.compiled and (calibration is None or calibration.launch_ms_per_layer is None):
        notes.append(f"planned for compiled steps (--compile on): a fixed cost of "
                     f"{costs.launch_ms / config.num_hidden_layers:.3g} ms per layer, as an "
                     "H200 measured")
    if calibration is not None:
        launch = calibration.launch_ms_per_layer
        notes.append("corrected by `tide plan --calibrate` on real steps: "
                     + (f"fixed cost {launch:.3f} ms/layer, " if launch is not None else "")
                     + f"GPU ×{calibration.gpu_scale:.2f}, CPU ×{calibration.cpu_scale:.2f}, "
                     f"PCIe ×{calibration.io_scale:.2f}")
    if ram_note:
        notes.append(ram_note)
    if tiered and disk_note:
        notes.append(disk_note)
    notes.append(f"tokens per step {tps:.2f} from the {tps_source}"
                 + (f" (threshold {threshold:g})" if tps_source == "threshold" else ""))
    notes.append("routing statistics from " + ("the trace" if stats.source == "trace" else
                 "published figures (≈70 of 256 experts per 32-token step; similarity 0.985 → "
                 "0.95 over 5 steps" + (f"; each routing block's pool capped at "
                                         f"{cfg.expert_capacity}: ≈{mean_distinct:.0f} per step"
                                         if cfg.block_routing else "")
                 + "): pass --trace for this model's own"))
    if pool:
        notes.append(f"block routing: a step uses at most {pool} of {e} experts per layer "
                     f"({cfg.expert_capacity} per {cfg.block_size}-token routing block); "
                     + ("every layer holds a whole pool: tide loads it at a block's first step "
                        "and follows its shifts (τ 1)" if follows_pool else
                        f"with {pool} slots per layer tide would hold a block's whole pool"))
    full = bool((budgets >= e).all())
    drift = stats.drift[np.arange(layers), budgets]
    return Plan(
        model=model_name, profile=profile.name, policy="resident" if full else "tide",
        vram_budget_bytes=budget, dense_bytes=dense, kv_cache_bytes=kv, workspace_bytes=work,
        expert_bytes=eb,
        experts_per_layer={layer: int(b) for layer, b in zip(cfg.moe_layers, budgets.tolist(),
                                                             strict=True)},
        uniform=bool((budgets == budgets[0]).all()), tau=int(tau), tau_costs_ms=tau_costs,
        cpu_threads=costs.cpu_threads, cpu_mode=profile.cpu_mode, cpu_dtype=profile.cpu_dtype,
        block_length=wl.block_length,
        steps_per_block=steps, tokens_per_step=tps, context_tokens=wl.context_tokens,
        breakdown=breakdown, routing_source=stats.source,
        distinct_experts=tuple(float(x) for x in stats.distinct),
        drift=tuple(float(x) for x in drift),
        constants={**costs.to_dict(), "tokens_per_call": round(per_call, 3),
                   "slots_total": slots,
                   **({"calibration": calibration.to_dict()} if calibration else {})},
        alternatives=alternatives, warnings=tuple(warnings), notes=tuple(notes),
        num_experts=e, ram_budget_bytes=host.budget if host is not None else 0,
        experts_in_ram=dict(host.ram_per_layer) if tiered else {},
        staging_experts=host.staging_experts if tiered else 0,
        disk_gbps=gbps if tiered else None, misses=str(mode), experts_format=fmt.name,
        compiled=wl.compiled)


def predictor(*, plan: Plan, config: ModelConfig, profile: HardwareProfile,
              trace: RoutingTrace | None = None,
              workload: Workload | None = None) -> Callable[[Calibration | None], Breakdown]:
    """calibration → the model's step time for the plan's own B_ℓ and τ (routing statistics
    computed once; used to compare with, and fit to, measurements)."""
    wl = workload or Workload(block_length=plan.block_length, context_tokens=plan.context_tokens,
                              tokens_per_step=plan.tokens_per_step, compiled=plan.compiled)
    steps = plan.steps_per_block
    if trace is not None:
        traced = _trace_steps_per_block(trace)  # the run's own steps: ages follow them
        if traced:
            steps = steps_per_block(wl.block_length, wl.block_length / traced)
        stats = trace_stats(trace, cfg=config, max_age=steps)
    else:
        stats = published_stats(config, block_length=wl.block_length, max_age=steps)
    budgets = np.array([plan.experts_per_layer[layer] for layer in config.moe_layers])
    packed = plan.expert_bytes if plan.experts_format != "bf16" else None
    per_call = float(stats.tokens_per_call[np.arange(len(budgets)), budgets].mean())
    ram = np.array([plan.experts_in_ram[layer] for layer in config.moe_layers]) \
        if plan.tiered else None

    def run(calibration: Calibration | None) -> Breakdown:
        costs = hardware_costs(cfg=config, profile=profile, block_length=wl.block_length,
                               context_tokens=wl.context_tokens, tokens_per_call=per_call,
                               cpu_threads=plan.cpu_threads, calibration=calibration,
                               expert_bytes=packed, experts_format=plan.experts_format,
                               compiled=wl.compiled)
        return predict(Problem(cfg=config, costs=costs, stats=stats, steps=steps, ram=ram,
                               misses=MissMode(plan.misses)), budgets, plan.tau)

    return run

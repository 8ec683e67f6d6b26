"""Building what an engine runs, as functions of its options, a plan and the machine's facts:
the expert budgets per layer, the host expert store, and the expert runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from tidecli.errors import TideError
from tidecli.experts.compute import row_dtype
from tidecli.experts.formats import ExpertFormat, expert_format, ram_hint
from tidecli.experts.modes import SCRATCH_SLOTS, MissMode, parse_misses, resolve_misses
from tidecli.experts.offload import OffloadRuntime
from tidecli.experts.policies import LruPolicy, Policy, ResidentPolicy, StaticPolicy, TidePolicy
from tidecli.experts.qcache import ensure_cache
from tidecli.experts.qstore import CompressedHostStore, CompressedTieredStore, load_compressed_pools
from tidecli.experts.runtime import ResidentRuntime, load_expert_pools
from tidecli.experts.store import ExpertSource, HostExpertStore
from tidecli.experts.tiered import TieredExpertStore
from tidecli.experts.trace import RoutingTrace
from tidecli.memory import DeviceMemory, device_memory, host_tiers
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import torch_dtype
from tidecli.planner.auto import AUTO_CANDIDATES, MachineFacts
from tidecli.planner.plan import Plan
from tidecli.runtime.devices import pick_dtype
from tidecli.runtime.facts import routed_bytes, stream_blocker
from tidecli.runtime.options import EngineOptions, ResidencyOptions
from tidecli.units import GIB

DEFAULT_TAU = 4  # tide's τ when it neither follows a plan nor is given one

Tick = Callable[[int], None]  # bytes done since the last call
Ticker = Callable[[str, int], Tick]  # (stage, total bytes) → a tick for that stage


def experts_format(ckpt: Checkpoint, name: str) -> ExpertFormat:
    """The routed experts' format for this model (TideError when its sizes do not suit it)."""
    cfg = ckpt.config
    return expert_format(name, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)


def vram_split(ckpt: Checkpoint, opts: EngineOptions, facts: MachineFacts,
               vram_gib: float) -> DeviceMemory:
    """`vram_gib` split for this model, workload, dtype and experts' format."""
    fmt = experts_format(ckpt, facts.experts_format)
    wl = opts.workload
    return device_memory(ckpt.config, vram_gib, context_tokens=wl.context_tokens,
                         block_length=wl.block_length, dtype_bytes=facts.dtype_bytes,
                         expert_bytes=fmt.row_bytes if fmt.compressed else None)


def _check_lru(policy: str, budgets: dict[int, int], hint: str) -> None:
    if policy == "lru" and min(budgets.values()) < 1:
        raise TideError("the lru policy needs at least one expert slot per layer", hint)


def expert_budgets(ckpt: Checkpoint, opts: EngineOptions, *, plan: Plan | None,
                   facts: MachineFacts, mode: MissMode, default_vram: bool = False
                   ) -> tuple[dict[int, int] | None, DeviceMemory | None]:
    """Experts per MoE layer on the device (None: no limit asked for) and the VRAM split they
    were fitted into: a plan's B_ℓ, else --experts-per-layer, else as many as --vram holds
    (or, with `default_vram`, the free device memory) after the scratch slots misses need."""
    cfg, b_opts, policy = ckpt.config, opts.budgets, opts.residency.policy

    def memory(vram: float) -> DeviceMemory:
        return vram_split(ckpt, opts, facts, vram)

    if plan is not None:  # per-layer B_ℓ, as a plan gives them
        budgets = {int(k): int(v) for k, v in plan.experts_per_layer.items()}
        if set(budgets) != set(cfg.moe_layers) or \
                any(not 0 <= v <= cfg.num_experts for v in budgets.values()):
            raise TideError("the per-layer expert budgets do not fit this model (every MoE "
                            f"layer, each in 0..{cfg.num_experts})",
                            "make the plan with this model: tide plan --model ...")
        _check_lru(policy, budgets, "raise the budgets")
        mem = None
        if b_opts.vram_gib is not None:
            mem = memory(b_opts.vram_gib)
            mem.check_budgets(budgets, b_opts.vram_gib)
        return {layer: budgets[layer] for layer in cfg.moe_layers}, mem
    b = b_opts.experts_per_layer
    if b is not None and not 0 <= b <= cfg.num_experts:
        raise TideError(f"--experts-per-layer must be in 0..{cfg.num_experts}, got {b}",
                        f"e.g. --experts-per-layer {cfg.num_experts // 2}")
    vram = b_opts.vram_gib
    if vram is None and default_vram and b is None:
        vram = facts.vram_gib
    mem = None
    if vram is not None:
        mem = memory(vram)
        if b is None:
            scratch = facts.cuda and policy in ("static", "tide") and mode.uses_scratch
            b = mem.uniform_slots(SCRATCH_SLOTS if scratch else 0)
        elif b > mem.experts_per_layer:
            raise TideError(f"--experts-per-layer {b} does not fit --vram {vram:g} GiB "
                            f"(at most {mem.experts_per_layer})", "lower one of them")
    if b is None:
        return None, mem
    budgets = {layer: b for layer in cfg.moe_layers}
    _check_lru(policy, budgets, "raise --vram or --experts-per-layer")
    return budgets, mem


def choose_policy(ckpt: Checkpoint, opts: EngineOptions, facts: MachineFacts
                  ) -> tuple[str, str | None]:
    """The policy to run and, for `auto`, why in one line: resident when every expert fits the
    budget (--vram, else the device's free memory), else tide as the planner plans it."""
    policy = opts.residency.policy
    if policy != "auto":
        return policy, None
    cfg, b = ckpt.config, opts.budgets.experts_per_layer
    if b is not None:
        return ("resident", "auto: --experts-per-layer holds every expert") \
            if b >= cfg.num_experts else ("tide", "auto: --experts-per-layer is below the "
                                                  f"model's {cfg.num_experts} experts")
    vram = facts.vram_gib
    mem = vram_split(ckpt, opts, facts, vram)
    experts = cfg.num_experts * cfg.num_moe_layers * mem.expert_bytes
    where = f"--vram {vram:g} GiB" if opts.budgets.vram_gib is not None else \
        f"the {vram:.1f} GiB free"
    if mem.slots >= cfg.num_experts * cfg.num_moe_layers:
        return "resident", f"auto: every expert ({experts / GIB:.1f} GiB) fits {where}"
    return "tide", f"auto: the experts ({experts / GIB:.1f} GiB) do not fit {where}: tide"


def check_resident(ckpt: Checkpoint, opts: EngineOptions,
                   budgets: dict[int, int] | None) -> None:
    """--policy resident keeps every expert on the device: say plainly when the budget says no."""
    e = ckpt.config.num_experts
    if opts.residency.policy != "resident" or budgets is None or min(budgets.values()) >= e:
        return
    b_opts = opts.budgets
    if b_opts.experts_per_layer is not None:
        raise TideError(f"--policy resident keeps all {e} experts of a layer on the GPU; "
                        f"--experts-per-layer {b_opts.experts_per_layer} is fewer",
                        "drop --experts-per-layer, or use --policy auto or tide")
    raise TideError(f"the experts do not fit --vram {b_opts.vram_gib:g} GiB with --policy "
                    "resident", "raise --vram, or use --policy auto or tide")


def requested_misses(r: ResidencyOptions, plan: Plan | None) -> MissMode:
    """The miss mode asked for: `--misses`, or for `auto` a host-driven mode the plan chose
    (planner/auto.py: calibrated here and predicted faster than streaming)."""
    mode = parse_misses(r.misses)
    if mode is MissMode.AUTO and plan is not None and plan.misses in AUTO_CANDIDATES:
        return MissMode(plan.misses)
    return mode


def miss_mode(opts: EngineOptions, facts: MachineFacts, plan: Plan | None = None) -> MissMode:
    """Where static/tide misses will run, decided before the host store exists."""
    return resolve_misses(requested_misses(opts.residency, plan), cuda=facts.cuda,
                          stream_blocker=facts.stream_blocker)


# ---- the routing trace behind static popularity --------------------------------------------------


def _trace_counts(ckpt: Checkpoint, path: str | None) -> tuple[np.ndarray, list[int]] | None:
    if not path:
        return None
    tr = RoutingTrace.load(path)
    if tr.num_experts != ckpt.config.num_experts or tr.moe_layers != ckpt.config.moe_layers:
        raise TideError("the popularity trace was recorded with another model",
                        "record one with this model: tide generate --trace FILE")
    return tr.array().astype("int64"), tr.moe_layers


def popularity(ckpt: Checkpoint, path: str | None) -> dict[int, np.ndarray] | None:
    """Per MoE layer, in how many forward passes each expert was used."""
    got = _trace_counts(ckpt, path)
    if got is None:
        return None
    used = (got[0] > 0).sum(axis=0)
    return {layer: used[j] for j, layer in enumerate(got[1])}


def token_counts(ckpt: Checkpoint, path: str | None) -> dict[int, np.ndarray] | None:
    """Per MoE layer, how many tokens each expert received."""
    got = _trace_counts(ckpt, path)
    if got is None:
        return None
    totals = got[0].sum(axis=0)
    return {layer: totals[j] for j, layer in enumerate(got[1])}


# ---- the host store ----------------------------------------------------------------------------


def host_store(ckpt: Checkpoint, opts: EngineOptions, *, plan: Plan | None, facts: MachineFacts,
               device: torch.device, tick: Tick, notices: list[str],
               static_budgets: Callable[[], dict[int, int] | None],
               ticker: Ticker | None = None) -> ExpertSource:
    """The routed experts on the host: all in (pinned) RAM when they fit the RAM budget, else
    tiered — as many per layer in RAM as it holds (a plan's counts, else uniform), the rest read
    from the checkpoint's files on demand (a notice says so). A compressed format's rows come
    from its cache (experts/qcache.py), which is also what the disk tier reads."""
    pin = device.type == "cuda"
    fmt = experts_format(ckpt, opts.load.experts_dtype)
    need, budget = routed_bytes(ckpt, fmt), facts.ram_bytes
    if need <= budget:
        if fmt.compressed:
            return CompressedHostStore(ckpt, fmt, pin=pin, device=device, ticker=ticker,
                                       notices=notices)
        return HostExpertStore(ckpt, pin=pin, progress=tick)
    ram_map = staging = None
    if plan is not None and plan.tiered:
        ram_map, staging = dict(plan.experts_in_ram), plan.staging_experts
    itemsize = torch_dtype(ckpt.expert_dtype()).itemsize
    host = host_tiers(ckpt.config, budget, dtype_bytes=itemsize, staging_experts=staging,
                      ram_per_layer=ram_map,
                      expert_bytes=fmt.row_bytes if fmt.compressed else None)
    pop = popularity(ckpt, opts.residency.popularity_trace)
    # static with a popularity trace: its GPU placement is fixed, keep the next ones in RAM
    skip = static_budgets() if opts.residency.policy == "static" and pop is not None else None
    if fmt.compressed:
        quantize = ticker(f"quantize {fmt.name}", ckpt.routed_expert_bytes()) if ticker else None
        cache = ensure_cache(ckpt, fmt, device=device, progress=quantize, notices=notices)
        store = CompressedTieredStore(ckpt, fmt, cache, host, pin=pin, popularity=pop, skip=skip,
                                      progress=tick)
    else:
        store = TieredExpertStore(ckpt, host, pin=pin, popularity=pop, skip=skip, progress=tick)
    given = "given" if opts.budgets.ram_gib is not None else "available"
    notices.append(
        f"the routed experts need {need / GIB:.1f} GiB"
        + (f" in {fmt.name}" if fmt.compressed else "") + f" and {budget / GIB:.1f} GiB of RAM is "
        f"{given}: {host.ram_experts} of {host.ram_experts + host.disk_experts} stay in RAM, the "
        f"other {host.disk_experts} are read from disk when used (slower, same tokens)"
        + ("" if fmt.compressed else ram_hint(
            hidden=ckpt.config.hidden_size, inter=ckpt.config.moe_intermediate_size,
            experts=ckpt.config.num_moe_layers * ckpt.config.num_experts, budget=budget)))
    return store


# ---- the runtime -------------------------------------------------------------------------------


def resident_runtime(ckpt: Checkpoint, opts: EngineOptions, store: ExpertSource | None, *,
                     device: torch.device, dtype: torch.dtype, tick: Tick,
                     ticker: Ticker | None = None,
                     notices: list[str] | None = None) -> ResidentRuntime:
    fmt = experts_format(ckpt, opts.load.experts_dtype)
    layers = getattr(store, "layers", None)
    if layers is not None:  # already in host memory: copy from there (compressed rows as bytes)
        pools = {layer: buf.to(device, row_dtype(fmt, dtype)) for layer, buf in layers.items()}
    elif fmt.compressed:
        pools = load_compressed_pools(ckpt, fmt, device=device, ticker=ticker, notices=notices)
    else:
        pools = load_expert_pools(ckpt, device=device, dtype=dtype, progress=tick)
    return ResidentRuntime(ckpt.config, pools, device=device, dtype=dtype,
                           kernel=opts.load.kernel, fmt=fmt if fmt.compressed else None)


def policy_for(ckpt: Checkpoint, opts: EngineOptions, plan: Plan | None) -> Policy:
    r = opts.residency
    if r.policy == "tide":
        tau = r.tide.tau or (plan.tau if plan is not None else DEFAULT_TAU)
        cfg = ckpt.config  # block routing bounds a step's experts per layer
        pool = cfg.block_pool(opts.workload.block_length)
        return TidePolicy(replace(r.tide, tau=tau), pool_experts=pool)
    if r.policy == "lru":
        return LruPolicy()
    if r.policy == "static":
        return StaticPolicy(token_counts(ckpt, r.popularity_trace))
    return ResidentPolicy()


def cpu_setup(r: ResidencyOptions, plan: Plan | None, device: torch.device
              ) -> tuple[int, str, torch.dtype | None]:
    """Threads, threading mode and dtype of CPU misses: the options', or, when a plan places
    misses on the CPU, the plan's — what the profile measured fastest on this CPU, whose times
    the plan's CPU costs are. The dtype only beside a GPU: on a CPU device misses compute in the
    model's dtype, so that every policy keeps the resident tokens (None: the runtime's default)."""
    threads, mode, dtype = r.cpu_threads, r.cpu_mode, None
    if plan is not None and plan.misses in ("cpu", "split"):
        threads, mode = threads or plan.cpu_threads, plan.cpu_mode
        if device.type == "cuda":
            dtype = pick_dtype(plan.cpu_dtype, torch.device("cpu"))
    return threads, mode, dtype


def pooled_runtime(ckpt: Checkpoint, opts: EngineOptions, store: ExpertSource,
                   budgets: dict[int, int], *, plan: Plan | None, device: torch.device,
                   dtype: torch.dtype):
    """Slot pools and a policy: the streamed runtime when misses stream, else host-driven."""
    r, cfg = opts.residency, ckpt.config
    policy = policy_for(ckpt, opts, plan)
    cuda = device.type == "cuda"
    mode = MissMode.CPU
    if r.policy in ("static", "tide"):
        blocker = stream_blocker(device, dtype, store_dtype=store.dtype,
                                 tiered=not isinstance(store, HostExpertStore),
                                 pinned=store.pinned, fmt=store.format)
        mode = resolve_misses(requested_misses(r, plan), cuda=cuda, stream_blocker=blocker)
    if mode is MissMode.STREAM:
        from tidecli.experts.stream import StreamRuntime

        return StreamRuntime(cfg, store, budgets, policy, device=device, dtype=dtype,
                             kernel=opts.load.kernel, prefetch=r.prefetch == "layer",
                             prefetch_steps=r.prefetch == "step")
    threads, cpu_mode, cpu_dtype = cpu_setup(r, plan, device)
    return OffloadRuntime(cfg, store, budgets, policy, device=device, dtype=dtype,
                          cpu_threads=threads, cpu_mode=cpu_mode, cpu_dtype=cpu_dtype,
                          kernel=opts.load.kernel, misses=mode, scratch_slots=SCRATCH_SLOTS)

"""What an engine is asked for, in three groups: loading the model, residency of the routed
experts, and memory budgets; plus the workload it is planned for and, optionally, a plan to
follow exactly. Plain frozen data with its rules, and no torch: a command checks its options
before anything heavy loads (runtime/devices.py resolves the device and dtype names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tidecli.errors import TideError
from tidecli.experts.formats import parse_format
from tidecli.experts.modes import POLICIES, MissMode, TideOptions, parse_misses, parse_prefetch
from tidecli.hardware.probe import usable_cores
from tidecli.memory import check_ram_gib, check_vram_gib
from tidecli.planner.plan import Plan
from tidecli.planner.workload import Workload

# `auto`: resident when every expert fits the budget, else tide as the planner plans it
POLICY_CHOICES = ("auto", *POLICIES)

DTYPE_NAMES = ("auto", "bf16", "fp32", "fp16")
# the step's layer functions through torch.compile (model/parts.py); auto: on where CUDA, Triton
# and a C compiler are present (the engine resolves it), and back to eager if compiling fails
COMPILE_MODES = ("auto", "off", "on")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_compile(value: str, *, modes: tuple[str, ...] = COMPILE_MODES) -> str:
    """--compile's value, one of `modes` (bench and plan take on and off only)."""
    if value not in modes:
        raise TideError(f"unknown --compile {value!r}",
                        f"use {', '.join(m for m in modes if m != 'off')} or off")
    return value


def check_cpu_threads(n: int) -> None:
    """--cpu-threads: 0 (the free cores) up to the CPUs this process may run on."""
    if n < 0:
        raise TideError(f"--cpu-threads must not be negative, got {n}",
                        "0 uses the cores other processes leave free")
    usable = usable_cores()
    if n > usable:
        raise TideError(f"--cpu-threads {n} is more than the {usable} CPUs this process may use",
                        f"give at most {usable}, or 0 for the cores other processes leave free")


@dataclass(frozen=True)
class LoadOptions:
    model: str | None = None  # a folder, a Hub id or "demo" (None: TIDE_MODEL, else demo)
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA and bf16-capable CPUs, else fp32) | bf16 | fp32 | fp16
    kernel: str = "auto"  # expert kernel on the device: auto | grouped_mm | loop
    graphs: bool = True  # CUDA: replay steps as captured graphs (off: the same program, eager)
    experts_dtype: str = "bf16"  # the routed experts' format: bf16 | int8 | fp8 | int4 (lossy)
    compile: str = "off"  # CUDA: the step's layer functions through torch.compile (auto|on|off)

    def validate(self) -> None:
        if not _DEVICE.match(self.device):
            raise TideError(f"unknown device {self.device!r}", "use auto, cpu or cuda")
        if self.dtype not in DTYPE_NAMES:
            raise TideError(f"unknown dtype {self.dtype!r}", "use auto, bf16, fp32 or fp16")
        parse_format(self.experts_dtype)
        parse_compile(self.compile)


@dataclass(frozen=True)
class ResidencyOptions:
    policy: str = "auto"  # auto, or one of experts/policies.py: resident | lru | static | tide
    tide: TideOptions = field(default_factory=TideOptions)  # tau None: the planner's
    misses: MissMode = MissMode.AUTO  # where static/tide misses run (experts/modes.py)
    prefetch: str = "off"  # streamed misses: read the next layer's guessed experts ahead
    cpu_threads: int = 0  # 0: the plan's for misses, else the cores other processes leave free
    cpu_mode: str = "intra"
    popularity_trace: str | None = None  # static: expert popularity from this routing trace
    # the hardware profile tide plans with when it follows the planner (a reference name or a
    # file; None: this machine's saved one, measured once when missing; on a CPU device tide
    # plans only when one is given)
    profile: str | None = None

    def validate(self) -> None:
        if self.policy not in POLICY_CHOICES:
            raise TideError(f"unknown policy {self.policy!r}",
                            f"choose one of {', '.join(POLICY_CHOICES)}")
        parse_misses(self.misses)
        parse_prefetch(self.prefetch)
        check_cpu_threads(self.cpu_threads)
        if self.tide.tau is not None and self.tide.tau < 1:
            raise TideError(f"--tau must be at least 1, got {self.tide.tau}", "e.g. --tau 4")


@dataclass(frozen=True)
class BudgetOptions:
    vram_gib: float | None = None  # device budget; None: every expert (resident) or free VRAM
    ram_gib: float | None = None  # host RAM for the expert store; None: what is available
    experts_per_layer: int | None = None  # a uniform expert budget

    def validate(self) -> None:
        if self.vram_gib is not None:
            check_vram_gib(self.vram_gib)
        if self.ram_gib is not None:
            check_ram_gib(self.ram_gib)


@dataclass(frozen=True)
class EngineOptions:
    load: LoadOptions = field(default_factory=LoadOptions)
    residency: ResidencyOptions = field(default_factory=ResidencyOptions)
    budgets: BudgetOptions = field(default_factory=BudgetOptions)
    workload: Workload = field(default_factory=Workload)  # block, threshold, context planned for
    plan: Plan | None = None  # follow exactly this plan (its B_ℓ, τ, threads, RAM tiers, misses)

    def validate(self) -> None:
        self.load.validate()
        self.residency.validate()
        self.budgets.validate()

    def ignored(self, *, cuda: bool = True) -> list[str]:
        """The options given that the (resolved) policy does not use, each with why. On a CPU
        device --cpu-threads sets the threads of the whole model."""
        r, t = self.residency, self.residency.tide
        tide_only = [("--tau", t.tau is not None), ("--stall-refresh", t.stall_refresh),
                     ("--cold-start", not t.warm_start),
                     ("--refresh-last-step", not t.skip_last_step)]
        offload = [("--misses", r.misses is not MissMode.AUTO),
                   ("--popularity-trace", r.popularity_trace is not None),
                   ("--prefetch", r.prefetch != "off")]
        out = []
        if r.policy == "resident":
            given = [n for n, on in [*tide_only, *offload, ("--profile", r.profile is not None),
                                     ("--cpu-threads", cuda and r.cpu_threads != 0)] if on]
            if given:
                out.append(f"{', '.join(given)} (every expert stays on the GPU: nothing is "
                           "offloaded)")
        elif r.policy in ("lru", "static"):
            given = [n for n, on in tide_only if on]
            if r.policy == "lru":
                given += [n for n, on in offload if on]
            if given:
                out.append(f"{', '.join(given)} (they apply to other policies than {r.policy})")
            if r.profile is not None:
                out.append("--profile (only tide follows the planner)")
        elif r.profile is not None and (t.tau is not None or
                                        self.budgets.experts_per_layer is not None):
            out.append("--profile (tide plans only without --tau and --experts-per-layer)")
        return out


def engine_options(*, model: str | None = None, device: str = "auto", dtype: str = "auto",
                   graphs: bool = True, kernel: str = "auto", policy: str = "auto",
                   tau: int | None = None, stall_refresh: bool = False, warm_start: bool = True,
                   skip_last_step: bool = True, misses: str = "auto", prefetch: str = "off",
                   cpu_threads: int = 0,
                   popularity_trace: str | None = None, profile: str | None = None,
                   vram_gib: float | None = None, ram_gib: float | None = None,
                   experts_per_layer: int | None = None, block_length: int = 32,
                   threshold: float | None = None, context_tokens: int = 4096,
                   experts_dtype: str = "bf16", compile: str = "off") -> EngineOptions:
    """EngineOptions from the flat option names the commands use."""
    return EngineOptions(
        load=LoadOptions(model=model, device=device, dtype=dtype, kernel=kernel, graphs=graphs,
                         experts_dtype=parse_format(experts_dtype),
                         compile=parse_compile(compile)),
        residency=ResidencyOptions(
            policy=policy, tide=TideOptions(tau=tau, stall_refresh=stall_refresh,
                                            warm_start=warm_start, skip_last_step=skip_last_step),
            misses=parse_misses(misses), prefetch=parse_prefetch(prefetch),
            cpu_threads=cpu_threads,
            popularity_trace=popularity_trace, profile=profile),
        budgets=BudgetOptions(vram_gib=vram_gib, ram_gib=ram_gib,
                              experts_per_layer=experts_per_layer),
        workload=Workload(block_length=block_length, threshold=threshold,
                          context_tokens=context_tokens))

"""What a bench runs: its spec (workloads, budgets, policies, τ, formats) and its run points.

Torch-free: the command checks a spec before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tidecli.errors import TideError
from tidecli.experts.formats import parse_format
from tidecli.experts.modes import MISS_MODES, POLICIES, PREFETCH_MODES
from tidecli.model.config import ModelConfig
from tidecli.runtime.options import COMPILE_MODES

SCHEMA = "tide-bench/1"
# the model's own routing; the published statistics replayed (entering experts drawn at
# random); the same statistics as the top-k of drifting scores (entering experts foreseeable)
WORKLOADS = ("model", "synthetic", "drifting")
BASELINES = ("lru", "static")
# a wrong guess under --guess-accuracy: any expert the token did not choose, or the one its
# drifting scores rank just below its choice (a near miss)
GUESS_MISSES = ("random", "ranked")

PROMPTS = [
    "Explain why the sky is blue to a ten-year-old.",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarise the causes of the French Revolution in five bullet points.",
    "A train leaves at 9:40 and arrives at 13:05. How long is the journey? Show your steps.",
]


@dataclass
class BenchSpec:
    policies: list[str] = field(default_factory=lambda: ["resident", "lru", "static", "tide"])
    vram: list[float | None] = field(default_factory=list)  # GiB budgets
    experts: list[int] = field(default_factory=list)  # or uniform experts-per-layer budgets
    workloads: list[str] = field(default_factory=lambda: ["model", "synthetic"])
    taus: list[int | str] = field(default_factory=lambda: ["plan"])  # "plan": the planner's
    misses: list[str] = field(default_factory=lambda: ["auto"])  # static/tide miss placement
    prefetch: list[str] = field(default_factory=lambda: ["off"])  # read-ahead (streamed misses)
    # the read-ahead's guess on the synthetic workloads set to these accuracies (empty: the
    # model's router guesses, as on the model's own routing)
    guesses: list[float] = field(default_factory=list)
    guess_misses: str = "random"  # a wrong guess: a random expert, or the next-ranked one
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    gen_length: int = 256
    threshold: float | None = None  # None: the checkpoint's preset
    repeat: int = 1
    warmup_tokens: int = 64
    seed: int = 0
    formats: list[str] = field(default_factory=lambda: ["bf16"])  # of the routed experts
    compile: list[str] = field(default_factory=lambda: ["off"])  # the step's layer functions

    @property
    def compares_formats(self) -> bool:
        return self.formats != ["bf16"]

    def validate(self, *, need_budgets: bool = True) -> None:
        """`need_budgets=False`: budgets may still be empty (chosen once the model is known)."""
        if not self.formats:
            raise TideError("--experts-dtype names no format", "e.g. --experts-dtype bf16,int4")
        if not self.compile or any(c not in COMPILE_MODES for c in self.compile):
            raise TideError(f"--compile takes {', '.join(COMPILE_MODES)}", "e.g. --compile off,on")
        for f in self.formats:
            parse_format(f)
        wl = [w for w in self.workloads if w not in WORKLOADS]
        if wl or not self.workloads:
            raise TideError(f"unknown workload {', '.join(wl) or '(none)'}",
                            f"use {', '.join(WORKLOADS)} or a comma list: "
                            "--workloads model,synthetic")
        if any(v is not None and v <= 0 for v in self.vram):
            raise TideError("--vram budgets must be positive", "e.g. --vram 10,18")
        if any(b < 1 for b in self.experts):
            raise TideError("--experts-per-layer budgets must be at least 1",
                            "e.g. --experts-per-layer 8,16")
        if need_budgets and any(p != "resident" for p in self.policies) and \
                not (self.vram or self.experts):
            raise TideError("offload policies need a budget",
                            "add --vram 10,18 or --experts-per-layer 8,16")
        if not self.misses or any(m not in MISS_MODES for m in self.misses):
            raise TideError(f"--misses takes {', '.join(MISS_MODES)}", "e.g. --misses auto,stream")
        if not self.prefetch or any(m not in PREFETCH_MODES for m in self.prefetch):
            raise TideError(f"--prefetch takes {', '.join(PREFETCH_MODES)}",
                            "e.g. --prefetch off,layer")
        if any(not 0.0 <= g <= 1.0 for g in self.guesses):
            raise TideError("--guess-accuracy values are shares from 0 to 1",
                            "e.g. --guess-accuracy 1,0.9,0.5")
        if self.guesses and (not {"layer", "step"} & set(self.prefetch) or
                             all(w == "model" for w in self.workloads)):
            raise TideError("--guess-accuracy sets the read-ahead's guess on the synthetic "
                            "workloads", "add --prefetch layer (or step) --workloads "
                            "drifting (or synthetic)")
        if self.guess_misses not in GUESS_MISSES:
            raise TideError(f"--guess-misses takes {', '.join(GUESS_MISSES)}",
                            "e.g. --guess-misses ranked")
        if self.guess_misses == "ranked" and self.guesses and "synthetic" in self.workloads:
            raise TideError("--guess-misses ranked needs the drifting workload's scores; the "
                            "synthetic workload has none", "use --workloads drifting")
        if not self.taus or any(t != "plan" and (not isinstance(t, int) or t < 1)
                                for t in self.taus):
            raise TideError("--tau values must be 'plan' or at least 1", "e.g. --tau plan,1,2,4,8")
        if not self.prompts or self.repeat < 1 or self.gen_length < 1:
            raise TideError("nothing to run: give prompts, --repeat ≥ 1 and --gen-length ≥ 1",
                            "e.g. --gen-length 256 --repeat 1")

        bad = [p for p in self.policies if p not in POLICIES]
        if bad or not self.policies:
            raise TideError(f"unknown policy {', '.join(bad) or '(none)'}",
                            f"choose among {', '.join(POLICIES)}")


    def check_model(self, cfg: ModelConfig, *, context_tokens: int = 4096,
                    block_length: int = 32) -> None:
        """Refuse budgets this model cannot run, before any run starts (a bench that skips
        every run after loading the model helps nobody)."""
        from tidecli.memory import device_memory

        over = [b for b in self.experts if b > cfg.num_experts]
        if over:
            half = max(1, cfg.num_experts // 2)
            raise TideError(f"--experts-per-layer {over[0]}: the model has "
                            f"{cfg.num_experts} experts per layer",
                            f"use 1..{cfg.num_experts}, e.g. --experts-per-layer "
                            f"{max(1, half // 2)},{half}")
        for v in self.vram:
            if v is not None:  # refuses a budget that cannot hold the dense part
                device_memory(cfg, v, context_tokens=context_tokens, block_length=block_length)


def default_budgets(cfg: ModelConfig) -> list[int]:
    """Experts per layer to compare at when none are given: a quarter and a half of the
    model's experts, which every device can run."""
    e = cfg.num_experts
    return sorted({max(1, e // 4), max(1, e // 2)})


@dataclass
class RunPoint:
    workload: str
    policy: str
    vram: float | None
    tau: int | None
    experts: int | None = None
    misses: str | None = None
    planned: bool = False  # tide with the planner's τ and budgets (at this VRAM budget)
    fmt: str = "bf16"  # the routed experts' format
    prefetch: str = "off"  # read-ahead of streamed misses
    compile: str = "off"  # the step's layer functions compiled (on) or eager
    guess: float | None = None  # the read-ahead's set accuracy (synthetic workloads)

    @property
    def budget(self) -> str:
        if self.vram is not None:
            return f"{self.vram:g} GiB"
        return f"B={self.experts}" if self.experts is not None else "all"


def run_points(spec: BenchSpec) -> list[RunPoint]:
    pts: list[RunPoint] = []
    for c in spec.compile:
        for f in spec.formats:
            for w in spec.workloads:
                pts += _points(spec, w, f, c)
    return pts


def _points(spec: BenchSpec, w: str, f: str, c: str) -> list[RunPoint]:
    """One workload's runs in one format, compiled or not: resident, then each budget."""
    pts = [RunPoint(w, "resident", None, None, fmt=f, compile=c)] \
        if "resident" in spec.policies else []
    budgets = [(v, None) for v in spec.vram] + [(None, b) for b in spec.experts]
    for v, b in budgets:
        for p in spec.policies:
            if p == "resident":
                continue
            for m in (spec.misses if p in ("static", "tide") else [None]):
                # read-ahead only where misses may stream
                ahead = spec.prefetch if m in ("auto", "stream") else ["off"]
                for t in (spec.taus if p == "tide" else [None]):
                    plan = t == "plan" and b is None  # --experts fixes the budgets
                    tau = None if plan or t is None else (4 if t == "plan" else int(t))
                    for a in ahead:
                        set_guess = a != "off" and w != "model" and spec.guesses
                        # the step read-ahead also runs on its own guess (None)
                        own = [None] if a == "step" or not set_guess else []
                        for g in own + (spec.guesses if set_guess else []):
                            pts.append(RunPoint(w, p, v, tau, b, m, planned=plan, fmt=f,
                                                prefetch=a, compile=c, guess=g))
    return pts

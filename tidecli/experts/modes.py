"""The residency vocabulary, one for the runtime, the planner and every command: the policies,
tide's options, and where the static and tide policies run the pairs of experts missing from the
GPU slots, with one rule for `auto`. No torch here (commands check values before it loads).

- `stream`: the GPU reads a missed expert from pinned RAM inside the step (experts/stream.py);
  the whole step is one device program. Tokens are bitwise the resident run's.
- `cpu`: on the CPU, the paper's runtime (experts/offload.py); bf16 rounding may differ.
- `gpu`: copied into GPU scratch slots by the host, then the GPU's kernel; bitwise exact.
- `split`: CPU and GPU scratch slots at once, split by measured cost (experts/misses.py).
- `auto`: `stream` on a GPU when streaming is possible (every expert in pinned RAM, in the
  model's dtype, Triton present), else `cpu`: deterministic tokens, and what the planner's
  default plans model. Where it can stream, the plan the runtime follows runs `cpu` or `gpu`
  instead when that mode was calibrated on this machine and is predicted clearly faster
  (planner/auto.py; a notice says so). `split` is timing-dependent (the split follows
  measured costs) and never chosen by `auto`.

Read-ahead (`--prefetch`, streamed misses only): `layer` guesses each MoE layer's experts with
its router applied to the layer before's input, and places the guessed misses while that layer
computes (experts/stream.py); `off` places only what the routing asks for. Tokens are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tidecli.errors import TideError

POLICIES = ("resident", "lru", "static", "tide")  # experts/policies.py implements them
SCRATCH_SLOTS = 16  # GPU slots that misses computed on the GPU (gpu, split) pass through


class MissMode(str, Enum):
    AUTO = "auto"
    STREAM = "stream"
    SPLIT = "split"
    CPU = "cpu"
    GPU = "gpu"

    def __str__(self) -> str:
        return self.value

    @property
    def uses_scratch(self) -> bool:
        """Do these misses pass through GPU scratch slots (which come out of the VRAM budget)?"""
        return self in (MissMode.GPU, MissMode.SPLIT)


MISS_MODES = tuple(m.value for m in MissMode)


def parse_misses(value: str | MissMode) -> MissMode:
    try:
        return MissMode(value)
    except ValueError:
        raise TideError(f"unknown --misses {value!r}", f"use {', '.join(MISS_MODES)}") from None


# read-ahead of streamed misses: none, each layer's experts guessed by its router while the
# layer before computes, or a step's experts guessed from the step before and copied before
# it runs (experts/stepahead.py)
PREFETCH_MODES = ("off", "layer", "step")


def parse_prefetch(value: str) -> str:
    if value not in PREFETCH_MODES:
        raise TideError(f"unknown --prefetch {value!r}", f"use {', '.join(PREFETCH_MODES)}")
    return value


def resolve_misses(requested: str | MissMode, *, cuda: bool,
                   stream_blocker: str | None) -> MissMode:
    """The mode a runtime with these facts runs (never `auto`). `stream_blocker` says why
    streaming is impossible here (None: it is possible). On a CPU device both sides of `split`
    are the same processor, so it is `cpu`."""
    mode = parse_misses(requested)
    if mode is MissMode.STREAM and stream_blocker:
        raise TideError(f"--misses stream is not available: {stream_blocker}", "use --misses auto")
    if mode is MissMode.AUTO:
        return MissMode.STREAM if cuda and stream_blocker is None else MissMode.CPU
    if mode is MissMode.SPLIT and not cuda:
        return MissMode.CPU
    return mode


@dataclass(frozen=True)
class TideOptions:
    tau: int | None = None  # refresh every τ steps of a block; None: the plan's (4 without one)
    stall_refresh: bool = False  # True: the paper's refresh (promote, wait, compute)
    warm_start: bool = True  # keep the previous block's placement at a block's first step
    skip_last_step: bool = True  # no refresh on a block's known last step
    # block routing (LLaDA2.2): a layer whose slots hold a whole pool loads it at the block's
    # first step and refreshes whenever the pool shifts, whatever τ
    follow_pool: bool = True

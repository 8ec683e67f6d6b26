"""What the plan is for: block length, generation length, threshold, context → steps per block.

Without a routing trace, tokens committed per step come from the figures the LLaDA2 reports
publish (threshold 0.95, block 32: 2.55 for 2.0-mini, 3.19 for 2.0-flash; ≈ 5.6 at threshold 0.5
in 2.1 speed mode) and the definition (threshold 1.0 commits exactly the quota, 1 per step),
joined linearly. A trace replaces them with what the model really did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tidecli.decode.settings import PRESET_THRESHOLD, check_schedule
from tidecli.errors import TideError
from tidecli.model.config import ModelConfig

# (threshold, tokens per step) anchors; flash-class models (hidden ≥ 4096) are more confident.
_TPS_MINI = ((0.5, 5.6), (0.95, 2.55), (1.0, 1.0))
_TPS_FLASH = ((0.5, 5.6), (0.95, 3.19), (1.0, 1.0))


@dataclass(frozen=True)
class Workload:
    block_length: int = 32
    gen_length: int = 512
    threshold: float | None = None  # None → the checkpoint's decoding preset
    context_tokens: int = 4096  # KV cache reserved on the device (prompt + generation)
    tokens_per_step: float | None = None  # None → from the threshold (or the trace)
    compiled: bool = False  # the steps run compiled (--compile on): a smaller fixed cost

    def validate(self) -> None:
        check_schedule(gen_length=self.gen_length, block_length=self.block_length,
                       threshold=self.threshold)
        if self.context_tokens < self.block_length:
            raise TideError(f"--context must be at least one block ({self.block_length}), got "
                            f"{self.context_tokens}", "e.g. --context 4096")
        if self.tokens_per_step is not None and not 0 < self.tokens_per_step <= self.block_length:
            raise TideError("tokens per step must be in (0, block length]", "leave it unset")


def planned_threshold(cfg: ModelConfig, threshold: float | None) -> float:
    """The threshold a run would decode with: the given one, else the checkpoint's preset
    (0.5 for a LLaDA2.2 checkpoint, which decodes with Levenshtein editing)."""
    if threshold is not None:
        return threshold
    return PRESET_THRESHOLD["levenshtein" if cfg.edit_token_ids else "threshold"]


def estimated_tokens_per_step(cfg: ModelConfig, *, threshold: float, block_length: int) -> float:
    table = _TPS_FLASH if cfg.hidden_size >= 4096 else _TPS_MINI
    xs, ys = zip(*table, strict=True)
    tps = float(np.interp(threshold, xs, ys))  # clamps below 0.5: no published figure there
    # the anchors are for 32-token blocks; a shorter block cannot commit more than it holds
    return min(tps * block_length / 32 if block_length < 32 else tps, float(block_length))


def steps_per_block(block_length: int, tokens_per_step: float) -> int:
    """T of the τ program: a whole number of denoising steps per block, at least 2 so that
    τ ∈ {1..T−1} is not empty."""
    return max(2, min(block_length, int(math.floor(block_length / tokens_per_step + 0.5))))

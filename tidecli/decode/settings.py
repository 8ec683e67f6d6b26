"""How a reply is decoded: the settings every decoder reads, and their rules. No torch here,
so a command checks them before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tidecli.errors import TideError


def check_schedule(*, gen_length: int, block_length: int, threshold: float,
                   max_positions: int | None = None) -> None:
    """The rules every command's --gen-length, --block-length and --threshold follow (decoding
    and planning alike)."""
    if gen_length < 1:
        raise TideError(f"--gen-length must be at least 1, got {gen_length}",
                        "ask for a positive number of tokens")
    if block_length < 1:
        raise TideError(f"--block-length must be at least 1, got {block_length}",
                        "use 32 (the trained block length)")
    if max_positions is not None and max_positions % block_length:
        raise TideError(f"--block-length {block_length} does not divide the model's "
                        f"{max_positions} positions", "use 32 (the trained block length)")
    if not 0 < threshold <= 1:
        raise TideError(f"--threshold must be in (0, 1], got {threshold}",
                        "0.95 is the LLaDA2.0 default; 0.5-0.7 for 2.1")


@dataclass(frozen=True)
class DecodeSettings:
    gen_length: int = 512
    block_length: int = 32
    threshold: float = 0.95
    editing_threshold: float | None = None  # set → LLaDA2.1 token editing
    max_post_steps: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    use_cache: bool = True  # False → the slow reference path (whole window every step)

    def validate(self, max_positions: int | None = None) -> None:
        """Refuse out-of-range settings; without `max_positions` (the model not loaded yet) the
        block length is only checked to be positive."""

        def bad(msg: str, hint: str) -> TideError:
            return TideError(msg, hint)

        check_schedule(gen_length=self.gen_length, block_length=self.block_length,
                       threshold=self.threshold, max_positions=max_positions)
        if self.editing_threshold is not None and not 0 <= self.editing_threshold <= 1:
            raise bad(f"--editing-threshold must be in [0, 1], got {self.editing_threshold}",
                      "0.5 (quality) or 0.0 (speed) are the 2.1 model-card values")
        if not 0 <= self.temperature < math.inf:  # also refuses nan
            raise bad(f"--temperature must not be negative or infinite, got {self.temperature}",
                      "0 means greedy")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("--top-p must be in (0, 1]", "e.g. 0.9")
        if self.top_k is not None and self.top_k < 1:
            raise bad("--top-k must be at least 1", "e.g. 50")
        if self.max_post_steps < 0:
            raise bad("max post steps must not be negative", "the 2.1 default is 16")


    def ignored(self) -> list[str]:
        """Options given that greedy decoding does not use."""
        given = [n for n, v in (("--top-k", self.top_k), ("--top-p", self.top_p),
                                ("--seed", self.seed)) if v is not None]
        if self.temperature > 0 or not given:
            return []
        return [f"{', '.join(given)} (temperature 0 is greedy: nothing is sampled)"]

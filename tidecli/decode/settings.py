"""How a reply is decoded: the settings every decoder reads, their rules, and which decoding a
checkpoint gets with which preset. No torch here, so a command (and `tide plan`) checks them
before anything heavy loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tidecli.errors import TideError

# The decodings: LLaDA2.0 threshold, LLaDA2.1 token editing, LLaDA2.2 Levenshtein editing.
DECODINGS = ("threshold", "editing", "levenshtein")
# Each one's thresholds when not given: 0.95 as for 2.0 (and this tool's 2.1 default), the 2.1
# model card's quality edit threshold, the 2.2 recipe (threshold 0.5, editing 0.0).
PRESET_THRESHOLD = {"threshold": 0.95, "editing": 0.95, "levenshtein": 0.5}
PRESET_EDITING = {"editing": 0.5, "levenshtein": 0.0}


def decoding_mode(asked: str | None, *, editing_threshold: float | None,
                  edit_tokens: bool | None) -> str:
    """The decoding to run. Auto (None): levenshtein for a checkpoint with edit tokens, editing
    when an editing threshold is given, else threshold. `edit_tokens` None: not known here (an
    explicit choice is then taken as it is)."""
    if asked is None:
        if edit_tokens:
            return "levenshtein"
        return "threshold" if editing_threshold is None else "editing"
    if asked not in DECODINGS:
        raise TideError(f"unknown decoding {asked!r}", f"choose one of {', '.join(DECODINGS)}")
    if asked == "threshold" and editing_threshold is not None:
        raise TideError("--editing-threshold does not apply to --decoding threshold",
                        "use --decoding editing (2.1) or levenshtein (2.2), or drop it")
    if asked == "levenshtein" and edit_tokens is False:
        raise TideError("--decoding levenshtein needs a checkpoint with edit tokens "
                        "(delete_token_id and split_token_id in config.json: LLaDA2.2)",
                        "use --decoding threshold or editing with this checkpoint")
    return asked


def check_schedule(*, gen_length: int, block_length: int, threshold: float | None,
                   max_positions: int | None = None) -> None:
    """The rules every command's --gen-length, --block-length and --threshold follow (decoding
    and planning alike); a threshold of None is the decoding's preset."""
    if gen_length < 1:
        raise TideError(f"--gen-length must be at least 1, got {gen_length}",
                        "ask for a positive number of tokens")
    if block_length < 1:
        raise TideError(f"--block-length must be at least 1, got {block_length}",
                        "use 32 (the trained block length)")
    if max_positions is not None and max_positions % block_length:
        raise TideError(f"--block-length {block_length} does not divide the model's "
                        f"{max_positions} positions", "use 32 (the trained block length)")
    if threshold is not None and not 0 < threshold <= 1:
        raise TideError(f"--threshold must be in (0, 1], got {threshold}",
                        "0.95 is the LLaDA2.0 default; 0.5-0.7 for 2.1")


def check_routing_block(*, block_length: int, routing_block: int) -> None:
    """Block routing (LLaDA2.2) routes in aligned windows of `routing_block` tokens; a decode
    block must cover whole windows, so that a step never routes half a window."""
    if routing_block and block_length % routing_block:
        nearest = max(routing_block, block_length // routing_block * routing_block)
        raise TideError(f"--block-length {block_length} is not a multiple of the model's routing "
                        f"block ({routing_block} tokens)",
                        f"use --block-length {nearest} (a multiple of {routing_block})")


@dataclass(frozen=True)
class DecodeSettings:
    gen_length: int = 512
    block_length: int = 32
    threshold: float | None = None  # None → the decoding's preset (0.95; 0.5 for Levenshtein)
    editing_threshold: float | None = None  # set → LLaDA2.1 token editing (unless levenshtein)
    max_post_steps: int = 16
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    use_cache: bool = True  # False → the slow reference path (whole window every step)
    decoding: str | None = None  # threshold | editing | levenshtein; None → by the checkpoint

    def resolved(self, *, edit_tokens: bool | None = None) -> DecodeSettings:
        """These settings with the decoding chosen and its preset thresholds filled in.
        `edit_tokens`: whether the checkpoint has Levenshtein edit tokens (None: unknown)."""
        mode = decoding_mode(self.decoding, editing_threshold=self.editing_threshold,
                             edit_tokens=edit_tokens)
        threshold = PRESET_THRESHOLD[mode] if self.threshold is None else self.threshold
        editing = self.editing_threshold
        if editing is None and mode != "threshold":
            editing = PRESET_EDITING[mode]
        return replace(self, decoding=mode, threshold=threshold, editing_threshold=editing)

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
        decoding_mode(self.decoding, editing_threshold=self.editing_threshold, edit_tokens=None)


    def ignored(self) -> list[str]:
        """Options given that greedy decoding does not use."""
        given = [n for n, v in (("--top-k", self.top_k), ("--top-p", self.top_p),
                                ("--seed", self.seed)) if v is not None]
        if self.temperature > 0 or not given:
            return []
        return [f"{', '.join(given)} (temperature 0 is greedy: nothing is sampled)"]

"""The rules of a decoding schedule that every command shares (decoding and planning alike), and
which decoding a checkpoint gets with which preset. No torch here: `tide plan` checks them too."""

from __future__ import annotations

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

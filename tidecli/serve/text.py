"""From finished blocks to the text a client may see: append-only, cut at the first stop string.

Diffusion fills a block's positions in any order (and 2.1 editing rewrites them), so only a
block that is final adds text. Each time one is, the committed prefix is decoded again and only
the new suffix goes out, less what a later block may still change: a trailing incomplete UTF-8
sequence (the tokenizer decodes it as U+FFFD) and a tail that could be the start of a stop
string. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def settled(text: str, stops: Sequence[str]) -> str:
    """The part of `text` no later token can change: without a trailing incomplete character
    or a tail that may begin a stop string."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    return text[: end - stop_prefix_len(text[:end], stops)]


class TextStream:
    """The text of one generation as it is committed. `extend` takes the tokens of a finished
    block and returns the text to send now; `finish` takes the final text and returns the rest.
    The pieces joined are the final text cut at its first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self.stopped = False  # a stop string was found: generation should end
        self.final: str | None = None  # the whole answer, once finished

    def _advance(self, text: str) -> str:
        # a tokenizer whose decode is not prefix-stable could move text already sent; then wait
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def cut(self, text: str) -> str:
        """`text` up to its first stop string (marking the stream stopped when there is one)."""
        i = find_stop(text, self.stops)
        if i is None:
            return text
        self.stopped = True
        return text[:i]

    def extend(self, ids: Iterable[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        i = find_stop(text, self.stops)
        # a stop found decides only when no longer stop string, begun before it, may still
        # complete: the cut is at the earliest stop of the final text, however blocks fall
        if i is not None and len(settled(text, self.stops)) >= i:
            return self._advance(self.cut(text))
        return self._advance(settled(text, self.stops))

    def finish(self, final_text: str) -> str:
        """The rest of the text once generation ended; `final_text` decodes every token. The
        answer (`final`) is `final_text` cut at its first stop string."""
        self.final = self.cut(final_text)
        return self._advance(self.final)


class BlockTokens:
    """The generated tokens of each finished block, cut at the first EOS and at the generation
    length, exactly as the decoder's result is (`GenerationResult.token_ids`)."""

    def __init__(self, gen_length: int, eos_ids: set[int] | frozenset[int]) -> None:
        self.gen_length = gen_length
        self.eos_ids = frozenset(eos_ids)
        self.count = 0
        self.ended = False

    def take(self, ev: Any) -> list[int]:
        """The new final tokens of a StepEvent whose block is done ([] for any other)."""
        if not ev.block_done or self.ended:
            return []
        out: list[int] = []
        limit = ev.gen_start + self.gen_length
        for i, tok in enumerate(ev.block_tokens):
            pos = ev.block_start + i
            if pos < ev.gen_start or pos >= limit:
                continue
            if tok in self.eos_ids:
                self.ended = True
                break
            out.append(tok)
        self.count += len(out)
        self.ended = self.ended or ev.block_start + len(ev.block_tokens) >= limit
        return out

"""When the streamed runtime's read-aheads (across layers: experts/layerahead.py; between steps:
experts/stepahead.py) place their guesses, and how their guesses are scored."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from tidecli.model.counters import ExpertStats


@dataclass
class ReadAheadGate:
    """Keeps the read-ahead on only while its guesses pay: judged over `window` forwards that
    placed guesses, it turns off when fewer than `min_accuracy` of the guessed experts were
    used by their layer (each unused one cost a copy and a slot), and tries again after
    `retry_every` forwards off. The device still computes the guesses while it is off (the
    captured step has them); they place nothing."""

    min_accuracy: float = 0.5
    window: int = 8
    retry_every: int = 64
    on: bool = True
    off_forwards: int = 0  # forwards spent off, in all
    _placed: int = 0
    _used: int = 0
    _seen: int = 0
    _off_for: int = 0

    def forward_done(self, placed: int, used: int) -> None:
        if not self.on:
            self.off_forwards += 1
            self._off_for += 1
            if self._off_for >= self.retry_every:
                self.on, self._off_for = True, 0
            return
        if placed <= 0:  # nothing guessed this forward (not a refresh): nothing to judge
            return
        self._placed += placed
        self._used += used
        self._seen += 1
        if self._seen >= self.window:
            self.on = self._used >= self.min_accuracy * self._placed
            self._placed = self._used = self._seen = 0

    def after_forward(self, stats: ExpertStats, placed: bool,
                      score: Callable[[], tuple[int, int]]) -> None:
        """A forward is done: off, it counts in `stats` as a forward without the read-ahead;
        on, where the read-ahead `placed` this forward, `score()` (placed, used) is judged."""
        if not self.on:
            stats.prefetch_off_forwards = 1
            self.forward_done(0, 0)
        elif placed:
            self.forward_done(*score())


def score_guesses(src: np.ndarray, counts: np.ndarray, layers: Iterable[int],
                  stats: ExpertStats, expert_bytes: int) -> tuple[int, int]:
    """What the read-ahead placed in a forward (`src` [M, slots]: the experts each MoE layer's
    guess placed, -1 past them) and how much of it its layer then used (`counts` [M, E]),
    added to the forward's counters; returns the totals (placed, used) for the gate."""
    placed_all = used_all = 0
    for j, layer in enumerate(layers):
        placed = src[j][src[j] >= 0]
        if not placed.size:
            continue
        used = int((counts[j][placed] > 0).sum())
        placed_all += int(placed.size)
        used_all += used
        c = stats.layer(layer)
        c.prefetched += int(placed.size)
        c.prefetch_used += used
        c.promotions += int(placed.size)
        c.bytes_h2d += int(placed.size) * expert_bytes
        c.bytes_prefetch_wasted += (int(placed.size) - used) * expert_bytes
    return placed_all, used_all

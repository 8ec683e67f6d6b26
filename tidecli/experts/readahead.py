"""When the streamed runtime's read-ahead (experts/stream.py, `prefetch`) places its guesses."""

from __future__ import annotations

from dataclasses import dataclass


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

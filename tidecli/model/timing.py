"""Per-part timing of a forward pass (attention, router, experts, ...) without host syncs.

`mark(name)` closes the running part and opens `name`. On CUDA the marks are events read once
at the end; on the CPU they are wall-clock reads.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class StepTimers:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self.totals: dict[str, float] = defaultdict(float)  # milliseconds

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def stop(self) -> None:
        """Close the last part and fold the marks into `totals` (syncs once on CUDA)."""
        if not self._marks:
            return
        self._marks.append(("", self._now()))
        if self.cuda:
            torch.cuda.synchronize()
        for (name, a), (_, b) in zip(self._marks, self._marks[1:], strict=False):
            if self.cuda:
                ms = a.elapsed_time(b)  # type: ignore[attr-defined]
            else:
                ms = (b - a) * 1000.0  # type: ignore[operator]
            self.totals[name] += ms
        self._marks.clear()


# the model's parts (model/llada2.py), each marked as the part of the step it starts
PARTS = (("attention_part", "attention"), ("dense_part", "dense_ffn"), ("route", "router"),
         ("expert_part", "experts"), ("shared_part", "shared_expert"), ("head", "lm_head"))


def profile_parts(model, timers: StepTimers):
    """Wrap the model's layer parts so that each marks `timers` as it starts (eager forward
    passes only: a captured step program runs without the host). Returns the undo function."""
    for name, label in PARTS:
        part = getattr(model, name)

        def marked(*args, _part=part, _label=label, **kwargs):
            timers.mark(_label)
            return _part(*args, **kwargs)

        setattr(model, name, marked)

    def undo() -> None:
        for name, _label in PARTS:
            delattr(model, name)

    return undo

"""Shared rich consoles (diagnostics on stderr, results on stdout) and progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def byte_progress(*, enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """Yield progress(stage, done_bytes, total_bytes): one bar per stage, with GB/s and ETA."""
    if not enabled or not err.is_terminal:
        yield lambda stage, done, total: None
        return
    bars = Progress(TextColumn("{task.description:>14}"), BarColumn(),
                    DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.update(tasks[stage], completed=done, total=total)

    with bars:
        yield update

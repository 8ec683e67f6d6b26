"""Building the engine for generate, chat and bench: the machine's profile first when the tide
policy will plan without one (measured once, with a progress bar, and saved), then the model with
a progress bar, then the engine's notices, one line each."""

from __future__ import annotations

from typing import Any

from tidecli.ui.console import byte_progress, err


def plans_on_this_machine(opts: Any) -> bool:
    """Will the engine plan tide with this machine's saved profile (no --profile given)?"""
    import torch

    from tidecli.planner.auto import follows_plan

    cuda = opts.device.startswith("cuda") or (opts.device == "auto" and
                                              torch.cuda.is_available())
    return opts.profile is None and follows_plan(opts, cuda=cuda)


def ensure_machine_profile() -> None:
    """Measure and save the quick profile now when this machine has none (one line says so)."""
    from tidecli.hardware.store import load_or_create_profile
    from tidecli.ui.profile_view import measure_progress

    def announce(message: str) -> None:
        err.print(f"{message} (for the planner, once; `tide profile` measures a full one)",
                  style="yellow", markup=False, soft_wrap=True)

    with measure_progress() as progress:
        load_or_create_profile(announce=announce, progress=progress)


def open_engine(opts: Any, *, build_runtime: bool = True, plans: bool | None = None) -> Any:
    """The engine for `opts`; `plans` says whether a later runtime will plan (default: from
    `opts`), so that a missing profile is measured before the model loads."""
    from tidecli.engine import Engine

    if plans_on_this_machine(opts) if plans is None else plans:
        ensure_machine_profile()
    with byte_progress() as progress:
        engine = Engine(opts, progress=progress, build_runtime=build_runtime)
    for note in engine.notices:
        err.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    engine.notices.clear()
    return engine

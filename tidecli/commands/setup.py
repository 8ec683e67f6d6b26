"""What generate, chat and bench share: building the engine (the machine's profile first when
the tide policy will plan without one — measured once, with a progress bar, and saved — then the
model with a progress bar, then the engine's notices, one line each), and the view a reply is
drawn in. Imported by the command bodies only: torch and rich load here."""

from __future__ import annotations

from typing import Any

from tidecli.ui.console import byte_progress, err
from tidecli.ui.live import LiveState, LiveView, PlainStream


def plans_on_this_machine(opts: Any) -> bool:
    """Will the engine plan tide with this machine's saved profile (no --profile given)?"""
    import torch

    from tidecli.runtime.autoplan import follows_plan

    device = opts.load.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return opts.residency.profile is None and follows_plan(opts, cuda=cuda)


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
    from tidecli.runtime.engine import Engine

    if plans_on_this_machine(opts) if plans is None else plans:
        ensure_machine_profile()
    with byte_progress() as progress:
        engine = Engine(opts, progress=progress, build_runtime=build_runtime)
    for note in engine.notices:
        err.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    engine.notices.clear()
    say_ignored(engine.ignored)
    return engine


def compile_ahead(engine: Any, settings: Any) -> None:
    """Where the steps compile (chat and serve by default), run one denoising step of a short
    prompt now, under a status line, so that the first reply or request does not wait for the
    compile (the first time on an H200 host: 10.5 s for the demo model, docs/benchmarks.md
    section 13; 22.8 s for mini on one step, section 22). Every step and commit pass has the
    block's shapes, so one step compiles what they run; a slow offloaded model is not made to
    decode a whole block for it. A compile that fails stops here (`--compile on`) or goes on
    eager with a note (`auto`). The runtime's counters start afresh after it."""
    if not engine.compiled:
        return
    import time
    from dataclasses import replace

    t0 = time.perf_counter()
    with err.status("compiling the step's kernels (longest the first time on this machine; "
                    "cached after)"):
        decoder = engine.decoder(engine.prompt_ids("Hello"),
                                 replace(settings, gen_length=settings.block_length,
                                         temperature=0.0, seed=None))
        steps = decoder.steps()
        try:
            next(steps, None)
        finally:
            steps.close()
    engine.runtime.reset_stats()
    for note in engine.notices:
        err.print(f"note: {note}", style="yellow", markup=False, soft_wrap=True)
    engine.notices.clear()
    if engine.compiled:
        err.print(f"step compiled in {time.perf_counter() - t0:.1f} s", style="dim",
                  markup=False, highlight=False)


def say_ignored(ignored: list[str]) -> None:
    """One `note:` line for the options given that do not apply to this run."""
    if ignored:
        err.print(f"note: ignored {'; '.join(ignored)}", style="yellow", markup=False,
                  soft_wrap=True)


def vram_probe(engine: Any):
    """A cheap reader of the allocator's counter on CUDA (host-side, no device sync), or None."""
    device = getattr(engine, "device", None)
    if device is None or getattr(device, "type", "") != "cuda":
        return None
    import torch

    return lambda: int(torch.cuda.memory_allocated(device))


def on_gpu(engine: Any) -> bool:
    return getattr(getattr(engine, "device", None), "type", "") == "cuda"


def pcie_peak_gbps(engine: Any) -> float | None:
    """The GPU link's peak per direction, shown beside the achieved host → GPU rate: as this
    machine's profile read it under load, else the link's maximum (an idle link reads low)."""
    device = getattr(engine, "device", None)
    if device is None or getattr(device, "type", "") != "cuda":
        return None
    from tidecli.errors import TideError
    from tidecli.hardware import probe
    from tidecli.hardware.store import load_saved_profile

    try:
        saved = load_saved_profile()
    except TideError:  # a damaged profile is reported where it is used for planning
        saved = None
    if saved is not None and saved.pcie_peak_gbps:
        return saved.pcie_peak_gbps
    facts = probe.probe_gpu(index=device.index or 0)
    return probe.pcie_peak_gbps(facts.pcie_gen_max, facts.pcie_width_max) if facts else None


def open_view(engine: Any, settings: Any, *, info: Any, console: Any,
              live: bool) -> LiveView | PlainStream:
    """The live view on a terminal (when `live`), else plain streaming to the console's file.
    `info`: the engine's EngineInfo, when known."""
    tok = engine.tokenizer
    memory = info.memory if info is not None else None
    state = LiveState(tokens=tok, gen_length=settings.gen_length,
                      eos_ids=frozenset(getattr(tok.ids, "stop", ())) | {tok.ids.eos},
                      policy=engine.runtime.name,
                      tau=info.runtime.tau if info is not None else None,
                      pcie_peak_gbps=pcie_peak_gbps(engine), gpu=on_gpu(engine),
                      vram_budget_bytes=memory.budget if memory is not None else None)
    if live and console.is_terminal:
        return LiveView(state, console, vram_used=vram_probe(engine))
    return PlainStream(state, console.file)

"""`tide profile`: measure this machine for the planner, or list the reference profiles.

Nothing heavy at import time: torch loads only when a measurement starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tidecli.fsutil import check_writable

MODEL_HELP = ("Time experts of this checkpoint's shape (reads only its config.json; default: "
              "LLaDA2.0-mini's shape) and the read speed of the disk that holds it (default: "
              "the cache folder's).")


def profile(
    quick: Annotated[bool, typer.Option(
        "--quick", help="Fewer sizes and repeats: well under a minute.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the profile JSON on stdout.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    no_save: Annotated[bool, typer.Option(
        "--no-save", help="Do not save it as this machine's profile.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the profile JSON to this file.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the reference profiles.")] = False,
) -> None:
    """Measure GPU, PCIe copies and CPU expert speed; saved for generate/chat/bench."""
    if list_:
        list_references(json_out=json_out)
        return
    if output is not None:
        output = check_writable(output)  # before measuring, not after it
    run_profile(quick=quick, json_out=json_out, model=model, no_save=no_save, output=output)


def list_references(*, json_out: bool) -> None:
    from tidecli.hardware.store import list_reference_profiles, load_reference_profile
    from tidecli.ui.profile_view import render_reference_list

    profiles = {name: load_reference_profile(name) for name in list_reference_profiles()}
    if json_out:
        rows = [{"name": name, "title": p.name, "gpu_name": p.gpu_name,
                 "vram_total_bytes": p.vram_total_bytes, "pcie_gen": p.pcie_gen,
                 "pcie_width": p.pcie_width, "ram_total_bytes": p.ram_total_bytes,
                 "ram_available_bytes": p.ram_available_bytes} for name, p in profiles.items()]
        typer.echo(json.dumps(rows, indent=2))
        return
    render_reference_list(profiles)


def expert_shape_for(folder: Path) -> tuple[int, int]:
    """(hidden, moe_intermediate) from a checkpoint's config.json, without touching weights."""
    from tidecli.model.config import load_config

    cfg = load_config(folder)
    return cfg.hidden_size, cfg.moe_intermediate_size


def with_host_handoff(prof):
    """The profile with `host_layer_ms` measured on its device (runtime/handoff.py); a failed
    measurement becomes a note and the planner's stated assumption."""
    from dataclasses import replace

    from tidecli.hardware.measure import attempt
    from tidecli.runtime.handoff import measure_host_layer_ms

    notes = list(prof.notes)
    ms = attempt("host hand-off",
                 lambda: measure_host_layer_ms("cuda" if prof.gpu_name else "cpu"), notes)
    if ms is None:
        return replace(prof, notes=notes)
    return replace(prof, host_layer_ms={m: round(v, 4) for m, v in ms.items()},
                   sources={**prof.sources, "host_layer_ms": "measured"})


def run_profile(*, quick: bool, json_out: bool, model: str | None, no_save: bool,
                output: Path | None) -> None:
    from tidecli.hardware.measure import measure_profile
    from tidecli.hardware.store import save_profile
    from tidecli.model.resolve import config_folder
    from tidecli.ui.console import err
    from tidecli.ui.profile_view import measure_progress, render_profile

    folder = config_folder(model)[0] if model else None  # the disk read is timed there
    shape = expert_shape_for(folder) if folder else None
    err.print(f"measuring this machine ({'quick' if quick else 'full'} profile) …")
    with measure_progress() as progress:
        prof = measure_profile(quick=quick, expert_shape=shape, progress=progress,
                               disk_folder=folder)
    err.print("timing a MoE layer's hand-off to the host (a tiny synthetic model) …")
    prof = with_host_handoff(prof)
    saved = None if no_save else save_profile(prof)
    if output is not None:
        save_profile(prof, output)
    render_profile(prof, saved_to=saved)
    if output is not None:
        err.print(f"written to {output}")
    if json_out:
        typer.echo(json.dumps(prof.to_dict(), indent=2))

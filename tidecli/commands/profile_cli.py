"""`tide profile`: measure this machine for the planner, or list the reference profiles.

Registered by cli.py when present. Nothing heavy at import time: torch loads only when a
measurement starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tidecli.errors import TideError

MODEL_HELP = ("Time experts of this checkpoint's shape (reads only its config.json; default: "
              "LLaDA2.0-mini's shape) and the read speed of the disk that holds it (default: "
              "the cache folder's).")


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        quick: bool = typer.Option(False, "--quick",
                                   help="Fewer sizes and repeats: well under a minute."),
        json_out: bool = typer.Option(False, "--json", help="Print the profile JSON on stdout."),
        model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        no_save: bool = typer.Option(False, "--no-save",
                                     help="Do not save it as this machine's profile."),
        output: Path | None = typer.Option(None, "--output", "-o",
                                           help="Also write the profile JSON to this file."),
        list_: bool = typer.Option(False, "--list", help="List the reference profiles."),
    ) -> None:
        """Measure GPU, PCIe copies and CPU expert speed; saved for generate/chat/bench."""
        if list_:
            list_references(json_out=json_out)
            return
        run_profile(quick=quick, json_out=json_out, model=model, no_save=no_save,
                    output=output)


def list_references(*, json_out: bool) -> None:
    from tidecli.hardware.store import list_reference_profiles, load_reference_profile
    from tidecli.ui.profile_view import render_reference_list

    profiles = {name: load_reference_profile(name) for name in list_reference_profiles()}
    if json_out:
        rows = [{"name": name, "title": p.name, "gpu_name": p.gpu_name,
                 "vram_total_bytes": p.vram_total_bytes, "pcie_gen": p.pcie_gen,
                 "pcie_width": p.pcie_width} for name, p in profiles.items()]
        typer.echo(json.dumps(rows, indent=2))
        return
    render_reference_list(profiles)


def model_folder(model: str) -> Path:
    """The checkpoint's folder; for a Hub id not yet downloaded, where its config.json went."""
    from tidecli.model.resolve import DEMO, HUB_ID, resolve_model

    local = Path(model).expanduser()
    if model != DEMO and not local.exists() and HUB_ID.match(model):
        return _hub_config_folder(model)  # resolve_model would fetch every weight file
    return resolve_model(model, quiet=True)


def expert_shape_for(model: str) -> tuple[int, int]:
    """(hidden, moe_intermediate) from a checkpoint's config.json, without touching weights."""
    from tidecli.model.config import load_config

    cfg = load_config(model_folder(model))
    return cfg.hidden_size, cfg.moe_intermediate_size


def _hub_config_folder(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise TideError("huggingface_hub is not installed", "pip install huggingface_hub") from exc
    try:
        return Path(hf_hub_download(repo_id, "config.json")).parent
    except Exception as exc:
        raise TideError(f"cannot read {repo_id}'s config.json ({type(exc).__name__})",
                        "check the id and your connection, or pass a local checkpoint folder") \
            from exc


def run_profile(*, quick: bool, json_out: bool, model: str | None, no_save: bool,
                output: Path | None) -> None:
    from tidecli.hardware.measure import measure_profile
    from tidecli.hardware.store import save_profile
    from tidecli.ui.console import err
    from tidecli.ui.profile_view import measure_progress, render_profile

    shape = expert_shape_for(model) if model else None
    folder = model_folder(model) if model else None  # the disk read is timed there
    err.print(f"measuring this machine ({'quick' if quick else 'full'} profile) …")
    with measure_progress() as progress:
        prof = measure_profile(quick=quick, expert_shape=shape, progress=progress,
                               disk_folder=folder)
    saved = None if no_save else save_profile(prof)
    if output is not None:
        save_profile(prof, output)
    render_profile(prof, saved_to=saved)
    if output is not None:
        err.print(f"written to {output}")
    if json_out:
        typer.echo(json.dumps(prof.to_dict(), indent=2))

"""`tide synth`: write a synthetic checkpoint of the real LLaDA2 format, with a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tidecli.commands.options import DeviceOpt
from tidecli.errors import TideError


def synth(
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Folder to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(
        metavar="[tiny|mini|flash|tiny22|flash22]",
        help="tiny (the demo's size), mini (LLaDA2.0-mini's shape), flash, flash22 "
             "(LLaDA2.2-flash: block routing and edit tokens) or tiny22.")] = "tiny",
    layers: Annotated[int | None, typer.Option(help="Keep only this many layers.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
    device: DeviceOpt = "auto",
    logit_scale: Annotated[float | None, typer.Option(
        help="Sharpen the lm_head (default per preset: a few tokens commit per step).")] = None,
    config_only: Annotated[bool, typer.Option(
        "--config-only", help="Write the config and tokenizer files only (for tide plan).")]
    = False,
) -> None:
    """Write a synthetic checkpoint of the real LLaDA2 format (random weights)."""
    from tidecli.commands.checks import check_device
    from tidecli.model.presets import preset_config

    preset_config(preset)  # an unknown preset fails before torch loads
    check_device(device)
    if layers is not None and layers < 1:
        raise TideError(f"--layers must be at least 1, got {layers}", "e.g. --layers 4")
    run_synth(out=out, preset=preset, layers=layers, seed=seed, force=force, device=device,
              logit_scale=logit_scale, config_only=config_only)


def run_synth(*, out: Path, preset: str, layers: int | None, seed: int, force: bool,
              device: str, logit_scale: float | None = None, config_only: bool = False) -> None:
    from tidecli.model.synth import plan, write_checkpoint
    from tidecli.ui.console import byte_progress, err

    p = plan(preset, layers=layers)
    size = "config only" if config_only else f"{p.total_bytes / 2**30:.2f} GiB"
    err.print(f"writing {preset} ({p.config.num_hidden_layers} layers, "
              f"{p.config.total_params() / 1e9:.2f} B params, {size}) to {out}")
    with byte_progress() as progress:
        write_checkpoint(out, preset=preset, layers=layers, seed=seed, force=force, device=device,
                         logit_scale=logit_scale, config_only=config_only,
                         progress=lambda done, total: progress("writing", done, total))
    err.print(f"done: {out}")

"""`tide synth`: write a synthetic checkpoint with a progress bar."""

from __future__ import annotations

from pathlib import Path

from tidecli.ui.console import byte_progress, err


def run_synth(*, out: Path, preset: str, layers: int | None, seed: int, force: bool,
              device: str, logit_scale: float | None = None) -> None:
    from tidecli.model.synth import plan, write_checkpoint

    p = plan(preset, layers=layers)
    err.print(f"writing {preset} ({p.config.num_hidden_layers} layers, "
              f"{p.config.total_params() / 1e9:.2f} B params, {p.total_bytes / 2**30:.2f} GiB) "
              f"to {out}")
    with byte_progress() as progress:
        write_checkpoint(out, preset=preset, layers=layers, seed=seed, force=force, device=device,
                         logit_scale=logit_scale,
                         progress=lambda done, total: progress("writing", done, total))
    err.print(f"done: {out}")

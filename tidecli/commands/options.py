"""Options shared by the commands, declared once (typer `Annotated` aliases): one flag, one help
text, everywhere. Imported at start-up, so nothing heavy here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Checkpoint folder, Hub id (e.g. inclusionAI/LLaDA2.0-mini) or 'demo'. "
                          "Env: TIDE_MODEL.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cuda or cpu.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")]
GraphsOpt = Annotated[bool, typer.Option("--graphs/--no-graphs",
                                         help="CUDA: replay each step as captured CUDA graphs.")]

# ---- residency ----------------------------------------------------------------------------------
PolicyOpt = Annotated[str, typer.Option(
    help="Expert residency: resident, lru, static or tide (without --tau or "
         "--experts-per-layer, tide follows the planner's plan for this machine).")]
TauOpt = Annotated[int | None, typer.Option(help="tide: refresh every TAU steps of a block.")]
MissesOpt = Annotated[str, typer.Option(
    help="static/tide: where experts missing from the GPU run: stream (the GPU places them or "
         "reads them from pinned RAM inside the step, no host round trip), split (CPU and GPU "
         "scratch slots by measured cost), cpu, or gpu (scratch slots); auto = stream on a GPU "
         "when the experts fit pinned RAM, else split (cpu on a CPU device). stream and gpu give "
         "bitwise the resident run's tokens.")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--profile", "-p",
    help="Hardware profile to plan with: a reference name (e.g. rtx4090) or a profile JSON. "
         "Default: this machine's saved profile, measured once when missing.")]
CpuThreadsOpt = Annotated[int, typer.Option(
    help="CPU threads for missed experts (0: the plan's, else torch's default).")]

# ---- budgets ------------------------------------------------------------------------------------
VramOpt = Annotated[float | None, typer.Option(
    help="GPU memory budget in GiB for tide's allocations (dense + KV + expert slots).")]
RamOpt = Annotated[float | None, typer.Option(
    help="Host RAM budget in GiB for the experts (those kept in RAM + staging buffers); experts "
         "beyond it are read from disk when used (slower, same tokens). Default: the available "
         "RAM minus 2 GiB.")]
ExpertsPerLayerOpt = Annotated[int | None, typer.Option(help="Force a uniform expert budget.")]

# ---- decoding -----------------------------------------------------------------------------------
GenLengthOpt = Annotated[int, typer.Option(help="Tokens to generate at most.")]
BlockLengthOpt = Annotated[int, typer.Option(help="Diffusion block length.")]
ThresholdOpt = Annotated[float, typer.Option(
    help="Commit a masked position above this confidence.")]
EditingThresholdOpt = Annotated[float | None, typer.Option(
    help="LLaDA2.1 token editing: rewrite generated tokens above this confidence (0.5 quality, "
         "0.0 speed). Off when not given.")]
MaxPostStepsOpt = Annotated[int, typer.Option(
    help="2.1 editing: extra steps once no mask is left.")]
TemperatureOpt = Annotated[float, typer.Option(help="0 is greedy.")]
TopPOpt = Annotated[float | None, typer.Option(help="Nucleus sampling (temperature > 0).")]
TopKOpt = Annotated[int | None, typer.Option(help="Top-k sampling (temperature > 0).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for sampling.")]
SystemOpt = Annotated[str | None, typer.Option(help="System prompt.")]
LiveOpt = Annotated[bool, typer.Option(
    "--live/--no-live", help="Draw the denoising live on a terminal (plain text when off or "
                             "when stdout is not a terminal).")]
TracePathOpt = Annotated[Path | None, typer.Option(
    help="Routing trace (.npz from `tide generate --trace`).")]

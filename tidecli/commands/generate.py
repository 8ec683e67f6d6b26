"""`tide generate`: one prompt, text on stdout, a summary on stderr (or one JSON object).

On a terminal the reply is drawn live as it is denoised; on a pipe each block's text is written
once it is final. Ctrl-C stops after the current step, prints the committed prefix and exits 130.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tidecli.commands.options import (
    BlockLengthOpt,
    CpuThreadsOpt,
    DeviceOpt,
    DtypeOpt,
    EditingThresholdOpt,
    ExpertsPerLayerOpt,
    GenLengthOpt,
    GraphsOpt,
    LiveOpt,
    MaxPostStepsOpt,
    MissesOpt,
    ModelOpt,
    PolicyOpt,
    ProfileOpt,
    RamOpt,
    SeedOpt,
    SystemOpt,
    TauOpt,
    TemperatureOpt,
    ThresholdOpt,
    TopKOpt,
    TopPOpt,
    VramOpt,
)
from tidecli.decode.session import SoftInterrupt, drive


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt ('-' reads it from stdin).")],
    model: ModelOpt = None,
    gen_length: GenLengthOpt = 512,
    block_length: BlockLengthOpt = 32,
    threshold: ThresholdOpt = 0.95,
    editing_threshold: EditingThresholdOpt = None,
    max_post_steps: MaxPostStepsOpt = 16,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, no chat template.")]
    = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
    = False,
    live: LiveOpt = True,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    reference: Annotated[bool, typer.Option(
        "--reference", help="Use the slow reference path (no KV cache).")] = False,
    trace: Annotated[Path | None, typer.Option(
        help="Record the routing trace (.npz) here.")] = None,
    policy: PolicyOpt = "resident",
    vram: VramOpt = None,
    ram: RamOpt = None,
    experts_per_layer: ExpertsPerLayerOpt = None,
    tau: TauOpt = None,
    stall_refresh: Annotated[bool, typer.Option(
        "--stall-refresh", help="tide ablation: promote before computing (paper).")] = False,
    cold_start: Annotated[bool, typer.Option(
        "--cold-start", help="tide ablation: empty the slots at each block.")] = False,
    refresh_last_step: Annotated[bool, typer.Option(
        "--refresh-last-step", help="tide ablation: refresh on a block's last step.")] = False,
    cpu_threads: CpuThreadsOpt = 0,
    popularity_trace: Annotated[Path | None, typer.Option(
        help="static: expert popularity from this routing trace (.npz from --trace).")] = None,
    graphs: GraphsOpt = True,
    misses: MissesOpt = "auto",
    profile: ProfileOpt = None,
) -> None:
    """Generate a reply to one prompt."""
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.runtime.options import engine_options

    opts = engine_options(
        model=model, device=device, dtype=dtype, graphs=graphs, policy=policy, tau=tau,
        stall_refresh=stall_refresh, warm_start=not cold_start,
        skip_last_step=not refresh_last_step, misses=misses, cpu_threads=cpu_threads,
        popularity_trace=str(popularity_trace) if popularity_trace else None, profile=profile,
        vram_gib=vram, ram_gib=ram, experts_per_layer=experts_per_layer,
        block_length=block_length, threshold=threshold)
    settings = DecodeSettings(
        gen_length=gen_length, block_length=block_length, threshold=threshold,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, use_cache=not reference)
    run_generate(prompt=prompt, opts=opts, settings=settings, system=system, raw=raw,
                 json_out=json_out, trace=trace, live=live)


def run_generate(*, prompt: str, opts, settings, system: str | None, raw: bool, json_out: bool,
                 trace: Path | None, live: bool = True,
                 pcie_peak_gbps: float | None = None) -> None:
    from tidecli.commands.setup import open_engine, open_view
    from tidecli.ui.console import err
    from tidecli.ui.live import make_console
    from tidecli.ui.panels import startup_panel
    from tidecli.ui.summary import generation_line

    if prompt == "-":
        prompt = sys.stdin.read()
    settings.validate()  # out-of-range options fail before the model loads
    engine = open_engine(opts)
    try:
        settings.validate(engine.cfg.max_position_embeddings)
        ids = engine.prompt_ids(prompt, system=system, raw=raw)
        if trace is not None:
            engine.runtime.enable_trace()
        engine.runtime.reset_stats()
        info = engine.describe()
        if not json_out and err.is_terminal:
            err.print(startup_panel(info, title="tide generate"))
        decoder = engine.decoder(ids, settings)
        view = None if json_out else open_view(engine, settings, info=info,
                                               console=make_console(), live=live,
                                               pcie_peak_gbps=pcie_peak_gbps)
        with SoftInterrupt() as stop, (view or contextlib.nullcontext()):
            result, interrupted = drive(decoder, view.update if view else None,
                                        should_stop=stop.is_set)
            text = engine.tokenizer.decode(result.token_ids)
            if view is not None:
                view.finish(text)
        if trace is not None:
            engine.runtime.trace.meta.update({"model": str(engine.path), "prompt_tokens": len(ids),
                                              "block_length": settings.block_length})
            engine.runtime.trace.save(trace)
        stats = engine.runtime.run_stats
        if json_out:
            out = {
                "text": text,
                "token_ids": result.token_ids,
                "prompt_tokens": result.prompt_tokens,
                "steps": result.steps,
                "forwards": result.forwards,
                "tokens_per_step": round(result.tokens_per_step, 4),
                "tokens_per_second": round(result.tokens_per_second, 4),
                "steps_per_second": round(result.steps_per_second, 4),
                "wall_seconds": round(result.wall_seconds, 4),
                "stopped_at_eos": result.stopped_at_eos,
                "finished": result.finished,
                "model": str(engine.path),
                **engine.describe().to_dict(),
                "expert_stats": stats.to_dict(),
            }
            sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        err.print(generation_line(tokens=len(result.token_ids), steps=result.steps,
                                  wall=result.wall_seconds, policy=engine.runtime.name,
                                  hit_rate=stats.summary()["hit_rate"]),
                  soft_wrap=True, markup=False)
        if interrupted:  # the committed prefix is out; the CLI exits 130
            err.print("interrupted: the text above is the committed prefix", style="yellow",
                      markup=False, soft_wrap=True)
            raise KeyboardInterrupt
    finally:
        engine.close()

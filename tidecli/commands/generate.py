"""`tide generate`: one prompt, text on stdout, a summary on stderr (or one JSON object).

On a terminal the reply is drawn live as it is denoised; on a pipe each block's text is written
once it is final. Ctrl-C stops after the current step, prints the committed prefix and exits 130.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tidecli.commands import checks
from tidecli.commands import options as opt
from tidecli.decode.session import SoftInterrupt, drive


@opt.with_options(opt.model_options, opt.decoding_options, opt.runtime_options)
def generate(
    prompt: Annotated[str, typer.Argument(
        metavar="PROMPT", help="The prompt ('-' reads it from stdin).")],
    system: opt.SystemOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as is, no chat template.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object on stdout.")] = False,
    live: opt.LiveOpt = True,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Use the slow reference path (no KV cache).")] = False,
    trace: Annotated[Path | None, typer.Option(
        help="Record the routing trace (.npz) here.")] = None,
    **options: Any,
) -> None:
    """Generate a reply to one prompt."""
    checks.check_options(options)  # before torch loads: a wrong value fails at once
    run_generate(prompt=prompt, opts=opt.engine_options_of(options),
                 settings=opt.decode_settings_of(options, use_cache=not reference), system=system,
                 raw=raw, json_out=json_out, trace=trace, live=live)


def run_generate(*, prompt: str, opts, settings, system: str | None, raw: bool, json_out: bool,
                 trace: Path | None, live: bool = True) -> None:
    from tidecli.commands.setup import on_gpu, open_engine, open_view, say_ignored
    from tidecli.fsutil import check_writable
    from tidecli.ui.console import err
    from tidecli.ui.live import make_console
    from tidecli.ui.panels import startup_panel
    from tidecli.ui.summary import generation_line

    if prompt == "-":
        prompt = sys.stdin.read()
    settings.validate()  # out-of-range options fail before the model loads
    if trace is not None:
        trace = check_writable(trace)  # before the generation, not after it
    engine = open_engine(opts)
    say_ignored(settings.ignored())
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
                                               console=make_console(), live=live)
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
                "seed": result.seed,
                "decoding": decoder.s.decoding,
                "threshold": decoder.s.threshold,
                "editing_threshold": decoder.s.editing_threshold,
                "model": str(engine.path),
                **engine.describe().to_dict(),
                "expert_stats": stats.to_dict(),
            }
            sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
        err.print(generation_line(tokens=len(result.token_ids), steps=result.steps,
                                  wall=result.wall_seconds, policy=engine.runtime.name,
                                  hit_rate=stats.summary()["hit_rate"] if on_gpu(engine) else None,
                                  seed=result.seed, demo=engine.is_demo),
                  soft_wrap=True, markup=False)
        if interrupted:  # the committed prefix is out; the CLI exits 130
            err.print("interrupted: the text above is the committed prefix", style="yellow",
                      markup=False, soft_wrap=True)
            raise KeyboardInterrupt
    finally:
        engine.close()

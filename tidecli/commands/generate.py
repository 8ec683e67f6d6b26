"""`tide generate`: one prompt, text on stdout, a summary on stderr (or one JSON object).

On a terminal the reply is drawn live as it is denoised; on a pipe each block's text is written
once it is final. Ctrl-C stops after the current step, prints the committed prefix and exits 130.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from tidecli.decode.session import SoftInterrupt, drive
from tidecli.ui.console import err
from tidecli.ui.live import LiveState, LiveView, PlainStream, make_console, startup_panel
from tidecli.ui.summary import generation_line


def vram_probe(engine: Any):
    """A cheap reader of the allocator's counter on CUDA (host-side, no device sync), or None."""
    device = getattr(engine, "device", None)
    if device is None or getattr(device, "type", "") != "cuda":
        return None
    import torch

    return lambda: int(torch.cuda.memory_allocated(device))


def open_view(engine: Any, settings: Any, *, info: dict[str, Any], console: Any, live: bool,
              pcie_peak_gbps: float | None = None) -> LiveView | PlainStream:
    """The live view on a terminal (when `live`), else plain streaming to the console's file."""
    tok = engine.tokenizer
    mem = info.get("memory_plan") or {}
    state = LiveState(tokens=tok, gen_length=settings.gen_length,
                      eos_ids=frozenset({tok.ids.eos}), policy=engine.runtime.name,
                      tau=info.get("tau"), pcie_peak_gbps=pcie_peak_gbps,
                      vram_budget_bytes=mem.get("budget_bytes"))
    if live and console.is_terminal:
        return LiveView(state, console, vram_used=vram_probe(engine))
    return PlainStream(state, console.file)


def run_generate(*, prompt: str, opts, gen_length: int, block_length: int,
                 threshold: float, editing_threshold: float | None, max_post_steps: int,
                 temperature: float, top_p: float | None, top_k: int | None, seed: int | None,
                 system: str | None, raw: bool, json_out: bool, reference: bool,
                 trace: Path | None, live: bool = True,
                 pcie_peak_gbps: float | None = None) -> None:
    from tidecli.commands.open_engine import open_engine
    from tidecli.decode.diffusion import DecodeSettings

    if prompt == "-":
        prompt = sys.stdin.read()
    settings = DecodeSettings(
        gen_length=gen_length, block_length=block_length, threshold=threshold,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, use_cache=not reference)
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
                                              "block_length": block_length})
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
                "steps_per_second": round(result.steps / result.wall_seconds, 4)
                if result.wall_seconds else 0.0,
                "wall_seconds": round(result.wall_seconds, 4),
                "stopped_at_eos": result.stopped_at_eos,
                "finished": result.finished,
                "model": str(engine.path),
                **engine.describe(),
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

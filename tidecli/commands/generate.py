"""`tide generate`: one prompt, text on stdout, a summary on stderr (or one JSON object)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tidecli.ui.console import byte_progress, err
from tidecli.ui.summary import generation_line


def run_generate(*, prompt: str, opts, gen_length: int, block_length: int,
                 threshold: float, editing_threshold: float | None, max_post_steps: int,
                 temperature: float, top_p: float | None, top_k: int | None, seed: int | None,
                 system: str | None, raw: bool, json_out: bool, reference: bool,
                 trace: Path | None) -> None:
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.engine import Engine

    if prompt == "-":
        prompt = sys.stdin.read()
    settings = DecodeSettings(
        gen_length=gen_length, block_length=block_length, threshold=threshold,
        editing_threshold=editing_threshold, max_post_steps=max_post_steps,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, use_cache=not reference)
    with byte_progress() as progress:
        engine = Engine(opts, progress=progress)
    try:
        settings.validate(engine.cfg.max_position_embeddings)
        ids = engine.prompt_ids(prompt, system=system, raw=raw)
        if trace is not None:
            engine.runtime.enable_trace()
        engine.runtime.reset_stats()
        decoder = engine.decoder(ids, settings)
        for _event in decoder.steps():
            pass
        result = decoder.result
        text = engine.tokenizer.decode(result.token_ids)
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
                "model": str(engine.path),
                **engine.describe(),
                "expert_stats": stats.to_dict(),
            }
            sys.stdout.write(json.dumps(out) + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        err.print(generation_line(tokens=len(result.token_ids), steps=result.steps,
                                  wall=result.wall_seconds, policy=engine.runtime.name,
                                  hit_rate=stats.summary()["hit_rate"]),
                  soft_wrap=True)
    finally:
        engine.close()

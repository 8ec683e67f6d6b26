"""`tide chat` options. Imported by cli.py at start-up, so nothing heavy at module level: the
body (tidecli/commands/chat.py) and torch load only when the command runs."""

from __future__ import annotations

from pathlib import Path

import typer

from tidecli.commands.help_text import (
    MISSES_HELP,
    MODEL_HELP,
    POLICY_HELP,
    PROFILE_HELP,
    RAM_HELP,
    VRAM_HELP,
)


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat(
        model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
        system: str | None = typer.Option(None, help="System prompt (/system changes it)."),
        gen_length: int = typer.Option(512, help="Tokens per reply at most."),
        block_length: int = typer.Option(32, help="Diffusion block length."),
        threshold: float = typer.Option(0.95, help="Commit a masked position above this "
                                                   "confidence."),
        editing_threshold: float | None = typer.Option(
            None, help="LLaDA2.1 token editing threshold (0.5 quality, 0.0 speed). Off when "
                       "not given."),
        temperature: float = typer.Option(0.0, help="0 is greedy."),
        seed: int | None = typer.Option(None, help="Seed for sampling."),
        policy: str = typer.Option("resident", help=POLICY_HELP),
        vram: float | None = typer.Option(None, help=VRAM_HELP),
        ram: float | None = typer.Option(None, help=RAM_HELP),
        experts_per_layer: int | None = typer.Option(None, help="Force a uniform expert "
                                                                "budget."),
        tau: int | None = typer.Option(None, help="tide: refresh every TAU steps of a block."),
        cpu_threads: int = typer.Option(0, help="CPU threads for missed experts (0: default)."),
        device: str = typer.Option("auto", help="auto, cuda or cpu."),
        dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
        live: bool = typer.Option(True, "--live/--no-live",
                                  help="Draw replies live as they are denoised (on a terminal)."),
        misses: str = typer.Option("auto", help=MISSES_HELP),
        profile: str | None = typer.Option(None, help=PROFILE_HELP),
        load: Path | None = typer.Option(None, "--load",
                                         help="Continue from a transcript saved with /save."),
    ) -> None:
        """Chat with a model: multi-turn, slash commands (/help), live denoising view."""
        from tidecli.commands.chat import run_chat
        from tidecli.decode.diffusion import DecodeSettings
        from tidecli.engine import EngineOptions

        opts = EngineOptions(model=model, device=device, dtype=dtype, policy=policy,
                             block_length=block_length, vram_gib=vram, ram_gib=ram,
                             experts_per_layer=experts_per_layer, tau=tau,
                             cpu_threads=cpu_threads, misses=misses, profile=profile,
                             threshold=threshold)
        settings = DecodeSettings(gen_length=gen_length, block_length=block_length,
                                  threshold=threshold, editing_threshold=editing_threshold,
                                  temperature=temperature, seed=seed)
        run_chat(opts=opts, settings=settings, system=system, live=live, transcript=load)

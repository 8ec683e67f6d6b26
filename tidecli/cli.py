"""The `tide` command line. Thin: options are parsed here and handed to a command module.

Nothing heavy is imported at module level, so `tide --help` never loads torch or touches CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import typer

from tidecli import __version__
from tidecli.errors import TideError

app = typer.Typer(
    name="tide",
    help="Run LLaDA2.x MoE diffusion language models on GPUs too small to hold them.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
)

from tidecli.commands.help_text import (  # noqa: E402
    MISSES_HELP,
    MODEL_HELP,
    POLICY_HELP,
    PROFILE_HELP,
    RAM_HELP,
    VRAM_HELP,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tide {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """tide: TIDE expert offload for LLaDA2.x diffusion language models."""


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt ('-' reads it from stdin)."),
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    gen_length: int = typer.Option(512, help="Tokens to generate at most."),
    block_length: int = typer.Option(32, help="Diffusion block length."),
    threshold: float = typer.Option(0.95, help="Commit a masked position above this confidence."),
    editing_threshold: float | None = typer.Option(
        None, help="LLaDA2.1 token editing: rewrite generated tokens above this confidence "
                   "(0.5 quality, 0.0 speed). Off when not given."),
    max_post_steps: int = typer.Option(16, help="2.1 editing: extra steps once no mask is left."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float | None = typer.Option(None, help="Nucleus sampling (temperature > 0)."),
    top_k: int | None = typer.Option(None, help="Top-k sampling (temperature > 0)."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    system: str | None = typer.Option(None, help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, no chat template."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    live: bool = typer.Option(True, "--live/--no-live",
                              help="Draw the denoising live on a terminal (plain text when off "
                                   "or when stdout is not a terminal)."),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
    reference: bool = typer.Option(False, "--reference",
                                   help="Use the slow reference path (no KV cache)."),
    trace: Path | None = typer.Option(None, help="Record the routing trace (.npz) here."),
    policy: str = typer.Option("resident", help=POLICY_HELP),
    vram: float | None = typer.Option(None, help=VRAM_HELP),
    ram: float | None = typer.Option(None, help=RAM_HELP),
    experts_per_layer: int | None = typer.Option(None, help="Force a uniform expert budget."),
    tau: int | None = typer.Option(None, help="tide: refresh every TAU steps of a block."),
    stall_refresh: bool = typer.Option(False, "--stall-refresh",
                                       help="tide ablation: promote before computing (paper)."),
    cold_start: bool = typer.Option(False, "--cold-start",
                                    help="tide ablation: empty the slots at each block."),
    refresh_last_step: bool = typer.Option(False, "--refresh-last-step",
                                           help="tide ablation: refresh on a block's last step."),
    cpu_threads: int = typer.Option(0, help="CPU threads for missed experts (0: default)."),
    calibration: Path | None = typer.Option(None, help="static: popularity from this trace."),
    graphs: bool = typer.Option(True, "--graphs/--no-graphs",
                                help="CUDA: replay each step as captured CUDA graphs."),
    misses: str = typer.Option("auto", help=MISSES_HELP),
    profile: str | None = typer.Option(None, help=PROFILE_HELP),
) -> None:
    """Generate a reply to one prompt."""
    from tidecli.commands.generate import run_generate
    from tidecli.engine import EngineOptions

    opts = EngineOptions(
        model=model, device=device, dtype=dtype, policy=policy, block_length=block_length,
        vram_gib=vram, ram_gib=ram, experts_per_layer=experts_per_layer, tau=tau,
        stall_refresh=stall_refresh, warm_start=not cold_start,
        skip_last_step=not refresh_last_step, cpu_threads=cpu_threads,
        calibration=str(calibration) if calibration else None, graphs=graphs, misses=misses,
        profile=profile, threshold=threshold)
    run_generate(
        prompt=prompt, opts=opts, gen_length=gen_length, block_length=block_length,
        threshold=threshold, editing_threshold=editing_threshold, max_post_steps=max_post_steps,
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, system=system, raw=raw,
        json_out=json_out, reference=reference, trace=trace, live=live)


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint into."),
    preset: str = typer.Option("tiny", help="tiny, mini (LLaDA2.0-mini shape) or flash."),
    layers: int | None = typer.Option(None, help="Keep only this many layers."),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    device: str = typer.Option("auto", help="Where to draw the random weights (auto, cpu, cuda)."),
    logit_scale: float | None = typer.Option(
        None, help="Sharpen the lm_head (default per preset: a few tokens commit per step)."),
) -> None:
    """Write a synthetic checkpoint of the real LLaDA2 format (random weights)."""
    from tidecli.commands.synth import run_synth

    run_synth(out=out, preset=preset, layers=layers, seed=seed, force=force, device=device,
              logit_scale=logit_scale)


# Commands that live in their own modules register themselves (imported without torch).
for _name in ("profile", "plan", "chat", "bench"):
    if importlib.util.find_spec(f"tidecli.commands.{_name}_cli") is not None:
        importlib.import_module(f"tidecli.commands.{_name}_cli").register(app)


def _fail(message: str, hint: str | None) -> None:
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    sys.stderr.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. the pageable-memory fallback) as one line, without source location."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    (file or sys.stderr).write(f"warning: {text}\n")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line (and a hint) per user error, exit 1; Ctrl-C exits 130."""
    import warnings

    debug = os.environ.get("TIDE_DEBUG") == "1"
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        code = _run(argv, debug=debug)
    sys.exit(code)


def _run(argv: list[str] | None, *, debug: bool) -> int:
    """Run the app and map every way it can end to an exit code (0, 1, 130 or click's)."""
    import click

    from tidecli.errors import out_of_memory

    try:
        code = app(args=argv, standalone_mode=False, prog_name="tide")
        if code == 130:  # typer >= 0.16 turns Ctrl-C into Exit(130) itself; older ones raise
            sys.stderr.write("\ninterrupted\n")
        return code if isinstance(code, int) else 0
    except TideError as exc:
        if debug:
            raise
        _fail(exc.message, exc.hint)
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt):
        if debug:
            raise
        sys.stderr.write("\ninterrupted\n")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an engine bug: still no traceback without TIDE_DEBUG
        if debug:
            raise
        known = out_of_memory(exc)
        if known is not None:  # torch's out-of-memory errors, raised from deep in a step
            _fail(known.message, known.hint)
            return 1
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"internal error: {type(exc).__name__}: {first}",
              "run again with TIDE_DEBUG=1 for the traceback, and please report it")
        return 1

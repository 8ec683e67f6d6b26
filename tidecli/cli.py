"""The `tide` command line. Thin: the root app wires the commands (commands/, one module each)
and maps every way a run can end to one line and an exit code.

Nothing heavy is imported at module level, so `tide --help` never loads torch or touches CUDA.
"""

from __future__ import annotations

import os
import sys

import typer

from tidecli import __version__
from tidecli.commands import bench, chat, generate, plan, profile, serve, synth
from tidecli.errors import TideError

app = typer.Typer(
    name="tide",
    help="Run LLaDA2.x MoE diffusion language models on GPUs too small to hold them.",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    rich_markup_mode=None,
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


# in the order a person meets them
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(plan.plan)
app.command()(profile.profile)
app.command()(bench.bench)
app.command()(synth.synth)


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

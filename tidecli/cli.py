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
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
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


# in the order a person meets them; summaries short enough never to be cut in the list
app.command(short_help="One reply to a prompt, drawn live as it is denoised.")(generate.generate)
app.command(short_help="Multi-turn chat with slash commands (/help).")(chat.chat)
app.command(short_help="An OpenAI-compatible HTTP server for one model.")(serve.serve)
app.command(short_help="Experts per layer, τ and speed for a model on a GPU.")(plan.plan)
app.command(short_help="Measure this machine, or list reference profiles.")(profile.profile)
app.command(short_help="Compare residency policies side by side.")(bench.bench)
app.command(short_help="Write a synthetic checkpoint (LLaDA2 format).")(synth.synth)


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
    """Entry point: one line (and a hint) per user error, exit 1; a usage error prints the usage
    line too, exit 2; Ctrl-C exits 130."""
    import warnings

    debug = os.environ.get("TIDE_DEBUG") == "1"
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
        code = _run(argv, debug=debug)
    sys.exit(code)


def _click_classes() -> tuple[type, type]:
    """(ClickException, UsageError) of the click that typer runs on: its own copy in recent
    typer versions, the click package in older ones. Found through typer's public BadParameter,
    so `except` matches on every typer the dependency range allows."""
    mro = {c.__name__: c for c in typer.BadParameter.__mro__}
    return mro["ClickException"], mro["UsageError"]


def _usage_error(exc: BaseException, args: list[str]) -> int:
    """The usage line, then the error as one line and where the help is; exit 2."""
    ctx = getattr(exc, "ctx", None)
    if ctx is None:  # some parser errors come without a context: the command's own
        ctx = _context_of(args)
    command = ctx.command_path if ctx is not None else "tide"
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # a group run bare
        sys.stdout.write(ctx.get_help() + "\n")
        return 0
    message = exc.format_message().strip().rstrip(".")
    message = message[:1].lower() + message[1:]
    if ctx is not None:
        sys.stderr.write(ctx.get_usage() + "\n")
    _fail(message, f"`{command} --help` shows the options")
    return 2


def _context_of(args: list[str]):
    """A context for the command `args` name (the root when none), for its usage line."""
    root = typer.main.get_command(app)
    ctx = typer.Context(root, info_name="tide")
    name = args[0] if args and not args[0].startswith("-") else None
    sub = root.get_command(ctx, name) if name else None  # type: ignore[attr-defined]
    return typer.Context(sub, info_name=name, parent=ctx) if sub is not None else ctx


def _run(argv: list[str] | None, *, debug: bool) -> int:
    """Run the app and map every way it can end to an exit code (0, 1, 2, 130)."""
    from tidecli.errors import out_of_memory

    click_exception, usage_error = _click_classes()
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # `tide` alone is a request for help, not a mistake
        args = ["--help"]
    try:
        code = app(args=args, standalone_mode=False, prog_name="tide")
        if code == 130:  # typer >= 0.16 turns Ctrl-C into Exit(130) itself; older ones raise
            sys.stderr.write("\ninterrupted\n")
        return code if isinstance(code, int) else 0
    except TideError as exc:
        if debug:
            raise
        _fail(exc.message, exc.hint)
        return 1
    except (typer.Abort, KeyboardInterrupt):
        if debug:
            raise
        sys.stderr.write("\ninterrupted\n")
        return 130
    except usage_error as exc:
        return _usage_error(exc, args)
    except click_exception as exc:
        _fail(exc.format_message(), None)
        return int(getattr(exc, "exit_code", 1))
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0))
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

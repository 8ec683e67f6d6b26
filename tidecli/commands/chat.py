"""`tide chat`: a multi-turn conversation with line editing, slash commands and the live view
(the terminal itself: commands/chat_app.py). Ctrl-C during a reply stops it after the current
step; Ctrl-C or Ctrl-D at the prompt ends the session with exit code 0."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tidecli.commands import checks
from tidecli.commands import options as opt

HISTORY_FILE = "chat_history"


@opt.with_options(opt.model_options, opt.decoding_options, opt.runtime_options)
def chat(
    ctx: typer.Context,
    system: Annotated[str | None, typer.Option(
        help="System prompt (/system changes it).")] = None,
    live: opt.LiveOpt = True,
    load: Annotated[Path | None, typer.Option(
        "--load", help="Continue from a transcript saved with /save.")] = None,
    **options: Any,
) -> None:
    """Chat with a model: multi-turn, slash commands (/help), live denoising view."""
    checks.check_options(options)  # before torch loads: a wrong value fails at once
    run_chat(opts=opt.engine_options_of(options, compile_default="auto"),
             settings=opt.decode_settings_of(options),
             system=system, live=live, transcript=load, given=opt.given(ctx, options))


def _readline_history() -> Callable[[], None]:
    """Line editing and input history through readline where Python has it; the history is kept
    in the config folder between sessions. Returns the function that saves it."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return lambda: None
    from tidecli.fsutil import config_dir

    path = config_dir() / HISTORY_FILE
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def run_chat(*, opts: Any, settings: Any, system: str | None, live: bool,
             transcript: Path | None = None, given: frozenset[str] = frozenset()) -> None:
    """`given`: the options typed on the command line; with --load they win over the
    transcript's settings."""
    import sys
    from dataclasses import fields, replace

    from tidecli.commands.chat_app import ChatApp
    from tidecli.commands.setup import compile_ahead, open_engine, say_ignored
    from tidecli.decode.session import ChatSession
    from tidecli.ui.console import err
    from tidecli.ui.live import make_console
    from tidecli.ui.panels import startup_panel

    settings.validate()  # out-of-range options fail before the model loads
    engine = open_engine(opts)
    say_ignored(settings.ignored())
    try:
        settings = engine.decode_settings(settings)  # this checkpoint's decoding and presets
        settings.validate(engine.cfg.max_position_embeddings)
        compile_ahead(engine, settings)
        session = ChatSession(settings=settings, system=system, model=str(engine.path),
                              max_positions=engine.cfg.max_position_embeddings)
        if transcript is not None:
            session.load(transcript)
            if system is not None:
                session.set_system(system)
            mine = {f.name: getattr(settings, f.name) for f in fields(settings)
                    if f.name in given}
            session.settings = replace(session.settings, **mine)
            kept = f"; kept from the command line: {', '.join(sorted(mine))}" if mine else ""
            err.print(f"loaded {len(session.turns)} turn(s) from {transcript} "
                      f"({session.describe_settings()}){kept}", style="dim", markup=False,
                      soft_wrap=True)
        info = engine.describe()
        interactive = sys.stdin.isatty()
        if err.is_terminal:
            err.print(startup_panel(info, title="tide chat"))
        if interactive:
            err.print("/help for commands · Ctrl-C stops a reply · Ctrl-D or /exit quits",
                      style="dim", markup=False, highlight=False)
        app = ChatApp(engine, session, out=make_console(), live=live, info=info)
        save_history = _readline_history() if interactive else (lambda: None)
        try:
            app.loop(interactive=interactive)
        finally:
            save_history()
    finally:
        engine.close()

"""The chat terminal of `tide chat`: reads input, dispatches slash commands and draws replies.

The conversation logic (turns, settings, transcripts) lives in tidecli/decode/session.py. Ctrl-C
during a reply stops it after the current step: the committed prefix is shown and kept in the
transcript (marked interrupted) but left out of the history the model sees. Ctrl-C or Ctrl-D at
the prompt ends the session with exit code 0 — except a Ctrl-C that comes just after one stopped
a reply (the second of a double press, which the help suggests to stop mid-step): that one only
says how to quit, so a double press never ends the conversation. Ctrl-C anywhere else (a slash
command, the bookkeeping after a reply) stops that and returns to the prompt.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from tidecli.commands.setup import on_gpu, open_view
from tidecli.decode.session import (
    ChatSession,
    Command,
    SoftInterrupt,
    Turn,
    drive,
    parse_command,
    read_message,
    reply_stats,
    unescape_message,
)
from tidecli.errors import TideError, out_of_memory
from tidecli.ui.console import err
from tidecli.ui.panels import layer_table
from tidecli.ui.summary import generation_line

PROMPT = "you> "
MORE = "...> "

HELP = """\
/help                 this list
/reset                forget the conversation (keeps the system prompt and settings)
/system [TEXT|off]    show, set or clear the system prompt
/set [NAME VALUE]     show the settings, or set threshold, gen_length,
                      editing_threshold (a number or off), temperature, seed (or off)
/stats                per-layer expert hit rate and CPU share of the last reply
/save FILE            write the transcript (messages, settings, stats) as JSON
/load FILE            continue from a saved transcript
/exit                 quit (also /quit, Ctrl-D, or Ctrl-C at the prompt)

Multi-line input: end a line with \\ to continue it, or paste between two lines of \"\"\".
Start a message with // to send text that begins with a slash.
Ctrl-C during a reply stops it after the current step; the partial text stays on screen and
in /save, but is not part of what the model sees next (press it twice to stop mid-step)."""

COMMANDS = ("help", "reset", "system", "set", "stats", "save", "load", "exit", "quit")
# a Ctrl-C at the prompt this soon after one stopped a reply was meant for the reply
STOPPED_GRACE_S = 1.5


@contextlib.contextmanager
def no_echo(stream: Any = None) -> Iterator[None]:
    """While a reply is drawn, keys typed ahead are not echoed: an echoed line would shift the
    live frame, which then leaves a stale copy above the reply. They stay in the terminal's
    input queue, and the next prompt reads them."""
    stream = stream or sys.stdin
    try:
        import termios

        fd = stream.fileno()
        old = termios.tcgetattr(fd) if stream.isatty() else None
    except (ImportError, OSError, ValueError):  # no termios (Windows), or no terminal
        old = None
    if old is None:
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


class ChatApp:
    def __init__(self, engine: Any, session: ChatSession, *, out: Any, live: bool = True,
                 info: Any = None) -> None:
        self.engine = engine
        self.session = session
        self.out = out
        self.live = live
        self.info = info  # the engine's EngineInfo (None: not shown)
        self._stopped_at: float | None = None  # when Ctrl-C last stopped a reply (monotonic)

    # ---- output ---------------------------------------------------------------------------------

    def note(self, msg: str, style: str | None = "dim") -> None:
        """One line of diagnostics on stderr (never wrapped, never parsed as markup)."""
        err.print(msg, style=style, markup=False, highlight=False, soft_wrap=True)

    def error(self, exc: TideError) -> None:
        self.note(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""),
                  style="red")

    # ---- one line of input ----------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Act on one message or slash command; False when the session should end."""
        if not line.strip():
            return True
        if line.strip() == "/":  # nothing to send, and no command
            self.note("/ alone is not a command: /help lists them (// sends text that starts "
                      "with a slash)", style="yellow")
            return True
        cmd = parse_command(line)
        if cmd is None:
            self.reply(unescape_message(line).strip())
            return True
        try:
            return self.command(cmd)
        except TideError as exc:
            self.error(exc)
            return True

    def command(self, cmd: Command) -> bool:
        s = self.session
        if cmd.name in ("exit", "quit"):
            return False
        if cmd.name == "help":
            self.out.print(HELP, markup=False, highlight=False)
        elif cmd.name == "reset":
            n = len(s.turns)
            s.reset()
            self.note(f"conversation cleared ({n} turn{'s' if n != 1 else ''} forgotten)")
        elif cmd.name == "system":
            if not cmd.arg:
                self.note(f"system prompt: {s.system!r}" if s.system else "no system prompt")
            else:
                s.set_system(None if cmd.arg.lower() in ("off", "none") else cmd.arg)
                self.note("system prompt set" if s.system else "system prompt cleared")
        elif cmd.name == "set":
            name, _, value = cmd.arg.partition(" ")
            if not name:
                self.note(s.describe_settings(), style=None)
            elif not value.strip():
                raise TideError(f"/set {name} needs a value", f"e.g. /set {name} 0.9")
            else:
                self.note(s.set_option(name, value), style=None)
        elif cmd.name == "stats":
            self.show_stats()
        elif cmd.name == "save":
            if not cmd.arg:
                raise TideError("/save needs a file name", "e.g. /save chat.json")
            path = s.save(cmd.arg)
            self.note(f"saved {len(s.turns)} turns to {path}")
        elif cmd.name == "load":
            if not cmd.arg:
                raise TideError("/load needs a file name", "e.g. /load chat.json")
            s.load(cmd.arg)
            self.note(f"loaded {len(s.turns)} turns from {cmd.arg}")
        else:
            close = difflib.get_close_matches(cmd.name, COMMANDS, n=1)
            guess = f"did you mean /{close[0]}? " if close else ""
            self.note(f"unknown command /{cmd.name}: {guess}/help lists the commands",
                      style="yellow")
        return True

    def show_stats(self) -> None:
        stats = self.session.last_stats()
        experts = (stats or {}).get("experts") or {}
        if not stats:
            self.note("no reply yet: /stats shows the last reply's expert counters")
            return
        self.note(generation_line(tokens=stats["tokens"], steps=stats["steps"],
                                  wall=stats["wall_seconds"], policy=self.engine.runtime.name,
                                  hit_rate=(experts.get("summary") or {}).get("hit_rate")
                                  if on_gpu(self.engine) else None,
                                  seed=stats.get("seed")),
                  style=None)
        per_layer = experts.get("per_layer") or {}
        if per_layer:
            self.out.print(layer_table(per_layer, title="experts per MoE layer, last reply"))
            if not on_gpu(self.engine):
                self.note("on a CPU device every expert runs on the CPU: the slots above are "
                          "what a GPU would hold")
        else:
            self.note("no expert counters for the last reply")

    # ---- a reply --------------------------------------------------------------------------------

    def reply(self, text: str) -> None:
        eng, s = self.engine, self.session
        settings = s.settings
        try:
            ids = eng.prompt_ids(text, system=s.system, history=s.history())
            eng.runtime.reset_stats()  # /stats is about this reply only
            decoder = eng.decoder(ids, settings)
            view = open_view(eng, settings, info=self.info, console=self.out, live=self.live)
            with SoftInterrupt() as stop, no_echo(), view:
                result, interrupted = drive(decoder, view.update, should_stop=stop.is_set)
                answer = eng.tokenizer.decode(result.token_ids)
                view.finish(answer)
        except TideError as exc:
            self.error(exc)
            return
        except KeyboardInterrupt:  # before decoding began (tokenising, allocating the cache)
            self._stopped_at = time.monotonic()
            self.note("stopped before the reply began")
            return
        except Exception as exc:
            oom = out_of_memory(exc, hint="/set gen_length smaller or /reset, or restart with a "
                                          "lower --vram or --experts-per-layer")
            if oom is None:
                raise
            # nothing of this reply is recorded; the next one starts from a fresh decoder
            self.error(type(oom)(f"{oom.message} during this reply", oom.hint))
            return
        stats = reply_stats(result, eng.runtime.run_stats.to_dict())
        s.record(Turn(user=text, assistant=answer, interrupted=interrupted, stats=stats,
                      settings=asdict(settings)))
        summary = (stats["experts"] or {}).get("summary") or {}
        self.note(generation_line(tokens=stats["tokens"], steps=stats["steps"],
                                  wall=stats["wall_seconds"], policy=eng.runtime.name,
                                  hit_rate=summary.get("hit_rate") if on_gpu(eng) else None,
                                  seed=stats.get("seed")))
        if interrupted:
            self._stopped_at = time.monotonic()
            self.note(f"stopped after {stats['tokens']} committed tokens: shown and kept in "
                      "/save, not added to the conversation", style="yellow")
        for note in eng.notices:  # what the engine learned during the reply (a failed compile)
            self.note(f"note: {note}", style="yellow")
        eng.notices.clear()

    # ---- the loop -------------------------------------------------------------------------------

    def loop(self, read: Callable[[str], str] | None = None, *, interactive: bool = True) -> None:
        read = read or input
        while True:
            try:
                self._turns(read, interactive)
                return
            except KeyboardInterrupt:
                # Python raises a Ctrl-C at its next check, which can fall between one turn's
                # end and the next prompt (the loop's own jump back), outside both handlers
                # below: it counts as a press at the prompt
                if not self._prompt_interrupt(interactive):
                    return

    def _turns(self, read: Callable[[str], str], interactive: bool) -> None:
        prompt, more = (PROMPT, MORE) if interactive else ("", "")
        while True:
            try:
                line = read_message(read, prompt, more)
            except KeyboardInterrupt:
                if self._prompt_interrupt(interactive):
                    continue
                return
            except EOFError:
                if interactive:
                    self.out.print()
                return
            try:
                if not self.handle(line):
                    return
            except KeyboardInterrupt:  # after a reply's decoding, or in a slash command
                self._stopped_at = time.monotonic()
                self.note("stopped; Ctrl-C again or Ctrl-D quits")

    def _prompt_interrupt(self, interactive: bool) -> bool:
        """Ctrl-C at the prompt: True to keep the session (the second press of the one that
        stopped a reply just now), False to end it."""
        if not interactive:
            return False
        self.out.print()  # leave the prompt line
        if self._stopped_at is not None and \
                time.monotonic() - self._stopped_at < STOPPED_GRACE_S:
            self._stopped_at = None
            self.note("the reply is already stopped; Ctrl-C again or Ctrl-D quits")
            return True
        return False

"""Chat sessions without any UI: turns, system prompt, decoding settings, per-reply stats,
slash-command parsing, multi-line input, transcripts as JSON, and stopping a reply cleanly.

Nothing here imports torch or rich, so it is cheap to test and to import.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tidecli.errors import TideError

TRANSCRIPT_FORMAT = "tide-chat"
TRANSCRIPT_VERSION = 1

# /set NAME VALUE: accepted names (dashes allowed) → DecodeSettings field
SETTABLE = {
    "threshold": "threshold",
    "gen_length": "gen_length",
    "editing_threshold": "editing_threshold",
    "temperature": "temperature",
    "seed": "seed",
}
OFF_WORDS = ("off", "none", "null")


# ---- turns and the session ----------------------------------------------------------------------


@dataclass
class Turn:
    """One exchange. An interrupted turn stays in the transcript but never in the model's history:
    a half-written reply would teach the next turn to continue mid-sentence."""

    user: str
    assistant: str
    interrupted: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Turn:
        return cls(user=str(d["user"]), assistant=str(d.get("assistant", "")),
                   interrupted=bool(d.get("interrupted", False)),
                   stats=dict(d.get("stats") or {}), settings=dict(d.get("settings") or {}))


def settings_from_dict(d: dict[str, Any], base: Any) -> Any:
    """A DecodeSettings like `base` with the known keys of `d` (unknown keys are ignored)."""
    names = {f.name for f in fields(base)}
    return replace(base, **{k: v for k, v in d.items() if k in names})


@dataclass
class ChatSession:
    settings: Any  # DecodeSettings (kept untyped here so this module stays import-light)
    system: str | None = None
    model: str | None = None
    max_positions: int | None = None
    turns: list[Turn] = field(default_factory=list)

    def history(self) -> list[dict[str, str]]:
        """Messages of the finished turns, oldest first, for the chat template."""
        out: list[dict[str, str]] = []
        for t in self.turns:
            if not t.interrupted:
                out.append({"role": "user", "content": t.user})
                out.append({"role": "assistant", "content": t.assistant})
        return out

    def reset(self) -> None:
        self.turns.clear()

    def set_system(self, text: str | None) -> None:
        self.system = text if text and text.strip() else None

    def set_option(self, name: str, value: str) -> str:
        """Apply `/set NAME VALUE`; returns 'name = value' as applied. Raises TideError."""
        key = SETTABLE.get(name.strip().lower().replace("-", "_"))
        if key is None:
            raise TideError(f"cannot set {name!r}", f"settable: {', '.join(SETTABLE)}")
        raw = value.strip()
        parsed: Any
        try:
            if key in ("editing_threshold", "seed") and raw.lower() in OFF_WORDS:
                parsed = None
            elif key in ("gen_length", "seed"):
                parsed = int(raw)
            else:
                parsed = float(raw)
        except ValueError as exc:
            want = "an integer" if key in ("gen_length", "seed") else "a number"
            hint = f"/set {key} <{want}>" + (" or off" if key in ("editing_threshold", "seed")
                                              else "")
            raise TideError(f"{key} needs {want}, got {raw!r}", hint) from exc
        changes: dict[str, Any] = {key: parsed}
        mode = getattr(self.settings, "decoding", None)
        if key == "editing_threshold" and mode in ("threshold", "editing"):
            # editing on or off switches between the 2.0 and 2.1 decodings, as on the command line
            changes["decoding"] = "threshold" if parsed is None else "editing"
        elif key == "editing_threshold" and mode == "levenshtein" and parsed is None:
            raise TideError("Levenshtein decoding always edits", "/set editing_threshold 0.9 "
                            "edits only confident tokens (the 2.2 preset is 0.0)")
        new = replace(self.settings, **changes)
        if self.max_positions is not None:
            new.validate(self.max_positions)
        self.settings = new
        return f"{key} = {'off' if parsed is None else parsed}"

    def describe_settings(self) -> str:
        s = self.settings
        edit = "off" if s.editing_threshold is None else f"{s.editing_threshold:g}"
        seed = "off" if s.seed is None else str(s.seed)
        thr = "preset" if s.threshold is None else f"{s.threshold:g}"
        mode = f"{s.decoding} decoding · " if getattr(s, "decoding", None) else ""
        return (f"{mode}threshold {thr} · gen_length {s.gen_length} · editing_threshold "
                f"{edit} · temperature {s.temperature:g} · seed {seed}")

    def record(self, turn: Turn) -> None:
        self.turns.append(turn)

    def last_stats(self) -> dict[str, Any] | None:
        return self.turns[-1].stats if self.turns else None

    # ---- transcript -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": TRANSCRIPT_VERSION,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": self.model,
            "system": self.system,
            "settings": asdict(self.settings),
            "turns": [asdict(t) for t in self.turns],
        }

    def load_dict(self, d: dict[str, Any]) -> None:
        """Replace system, settings and turns with a transcript's (the model is not changed)."""
        if not isinstance(d, dict) or d.get("format") != TRANSCRIPT_FORMAT:
            raise TideError("not a tide chat transcript", "save one with /save FILE")
        system = d.get("system")
        try:
            if system is not None and not isinstance(system, str):
                raise TypeError("system is not text")
            settings = settings_from_dict(d.get("settings") or {}, self.settings)
            turns = [Turn.from_dict(t) for t in d.get("turns") or []]
            if self.max_positions is not None:
                settings.validate(self.max_positions)  # a TideError names a bad value
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TideError(f"the transcript is damaged: {exc}", "save a new one") from exc
        self.settings, self.turns = settings, turns
        self.set_system(system)

    def save(self, path: str | Path) -> Path:
        from tidecli.fsutil import atomic_write_json

        return atomic_write_json(Path(path).expanduser(), self.to_dict())

    def load(self, path: str | Path) -> None:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise TideError(f"cannot read {p}: {exc.strerror or exc}", "check the path") from exc
        except ValueError as exc:
            raise TideError(f"{p} is not JSON", "give a file written by /save") from exc
        self.load_dict(data)


def reply_stats(result: Any, expert_stats: dict[str, Any] | None) -> dict[str, Any]:
    """Per-reply numbers for the transcript and /stats (result: a GenerationResult)."""
    wall = result.wall_seconds
    return {
        "tokens": len(result.token_ids),
        "prompt_tokens": result.prompt_tokens,
        "steps": result.steps,
        "forwards": result.forwards,
        "wall_seconds": round(wall, 4),
        "tokens_per_second": round(result.tokens_per_second, 4),
        "steps_per_second": round(result.steps / wall, 4) if wall > 0 else 0.0,
        "tokens_per_step": round(result.tokens_per_step, 4),
        "stopped_at_eos": result.stopped_at_eos,
        "finished": result.finished,
        "seed": getattr(result, "seed", None),
        "experts": expert_stats,
    }


# ---- input --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    name: str  # lower case, without the slash
    arg: str


def parse_command(line: str) -> Command | None:
    """`/name rest` → Command; anything else (including `//text`, a message starting with '/')
    → None."""
    s = line.strip()
    if not s.startswith("/") or s.startswith("//") or s == "/":
        return None
    name, _, arg = s[1:].partition(" ")
    return Command(name.lower(), arg.strip())


def unescape_message(line: str) -> str:
    """`//text` sends '/text' to the model."""
    s = line.lstrip()
    return s[1:] if s.startswith("//") else line


PASTE = '"""'


def read_message(read: Callable[[str], str], prompt: str, more: str) -> str:
    """One message from `read` (like input()): a line ending in a backslash continues on the
    next line; a line starting with three double quotes opens a block that a line ending in
    three double quotes closes. EOFError and KeyboardInterrupt pass through."""
    line = read(prompt)
    if line.lstrip().startswith(PASTE):
        first = line.lstrip()[len(PASTE):]
        if first.rstrip().endswith(PASTE):  # """one line"""
            return first.rstrip()[: -len(PASTE)]
        parts = [first] if first.strip() else []
        while True:
            nxt = read(more)
            if nxt.rstrip().endswith(PASTE):
                tail = nxt.rstrip()[: -len(PASTE)]
                if tail:
                    parts.append(tail)
                return "\n".join(parts)
            parts.append(nxt)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read(more)
    parts.append(line)
    return "\n".join(parts)


# ---- running a reply ----------------------------------------------------------------------------


class SoftInterrupt:
    """While active, the first Ctrl-C only sets a flag that the decoding loop checks between
    steps, so the expert runtime is never left half-way through a forward pass; a second
    Ctrl-C raises KeyboardInterrupt at once for a step that does not finish."""

    def __init__(self) -> None:
        self.hits = 0
        self._old: Any = None

    def is_set(self) -> bool:
        return self.hits > 0

    def _handler(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt

    def __enter__(self) -> SoftInterrupt:
        # signal handlers can only be set from the main thread (tests may run elsewhere)
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def drive(decoder: Any, on_event: Callable[[Any], None] | None = None, *,
          should_stop: Callable[[], bool] = lambda: False) -> tuple[Any, bool]:
    """Iterate `decoder.steps()`, handing each StepEvent to `on_event`; stop after a step when
    `should_stop()` turns true or on KeyboardInterrupt. Returns (result, interrupted); an
    interrupted result holds the committed prefix (`decoder.stop_early()`)."""
    steps: Iterator[Any] = decoder.steps()
    try:
        for event in steps:
            if on_event is not None:
                on_event(event)
            if should_stop():
                break
        else:
            return decoder.result, False
    except KeyboardInterrupt:
        pass
    with contextlib.suppress(Exception, KeyboardInterrupt):
        steps.close()  # type: ignore[attr-defined]
    return decoder.stop_early(), True

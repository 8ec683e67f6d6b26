"""Chat sessions: slash commands, multi-line input, transcripts, and replies with a fake engine."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from rich.console import Console

from tidecli.commands.chat_app import ChatApp
from tidecli.decode.diffusion import DecodeSettings, GenerationResult
from tidecli.decode.session import (
    ChatSession,
    Command,
    Turn,
    drive,
    parse_command,
    read_message,
    unescape_message,
)
from tidecli.errors import OutOfDeviceMemory, TideError
from tidecli.model.counters import ExpertStats, LayerCounters

MASK, EOS = 99, 98


def session(**kw) -> ChatSession:
    return ChatSession(settings=DecodeSettings(gen_length=16), max_positions=4096, **kw)


# ---- parsing and input --------------------------------------------------------------------------


def test_parse_command():
    assert parse_command("/set threshold 0.9") == Command("set", "threshold 0.9")
    assert parse_command("  /HELP  ") == Command("help", "")
    assert parse_command("/system You are terse.") == Command("system", "You are terse.")
    assert parse_command("hello /set") is None
    assert parse_command("//not a command") is None and parse_command("/") is None
    assert unescape_message("//etc/hosts is a file") == "/etc/hosts is a file"
    assert unescape_message("plain") == "plain"


def reader(lines):
    it = iter(lines)
    prompts = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read, prompts


def test_multi_line_input():
    read, prompts = reader(["first \\", "second\\", "third"])
    assert read_message(read, "> ", ".. ") == "first \nsecond\nthird"
    assert prompts == ["> ", ".. ", ".. "]
    read, _ = reader(['"""', "def f():", "    return 1", '"""'])
    assert read_message(read, "> ", ".. ") == "def f():\n    return 1"
    read, _ = reader(['"""start', "end here\"\"\""])
    assert read_message(read, "> ", ".. ") == "start\nend here"
    read, _ = reader(['"""one line"""'])
    assert read_message(read, "> ", ".. ") == "one line"
    read, _ = reader(['"""', "never closed"])
    with pytest.raises(EOFError):
        read_message(read, "> ", ".. ")


# ---- the session --------------------------------------------------------------------------------


def test_set_options_validate_and_keep_old_values_on_error():
    s = session()
    assert s.set_option("threshold", "0.9") == "threshold = 0.9"
    assert s.set_option("gen-length", "64") == "gen_length = 64"
    assert s.set_option("editing_threshold", "0.5") == "editing_threshold = 0.5"
    assert s.set_option("editing_threshold", "off") == "editing_threshold = off"
    assert s.set_option("temperature", "0.7") == "temperature = 0.7"
    assert s.set_option("seed", "3") == "seed = 3"
    assert (s.settings.threshold, s.settings.gen_length, s.settings.editing_threshold,
            s.settings.temperature, s.settings.seed) == (0.9, 64, None, 0.7, 3)
    for name, value, text in [("threshold", "1.5", "--threshold must be in (0, 1]"),
                              ("gen_length", "ten", "needs an integer"),
                              ("temperature", "-1", "must not be negative"),
                              ("block_length", "16", "cannot set")]:
        with pytest.raises(TideError, match=text.replace("(", r"\(").replace("]", r"\]")):
            s.set_option(name, value)
    assert s.settings.threshold == 0.9 and s.settings.gen_length == 64


def test_history_leaves_out_interrupted_turns():
    s = session(system="be brief")
    s.record(Turn(user="hi", assistant="hello"))
    s.record(Turn(user="tell me more", assistant="half a sen", interrupted=True))
    s.record(Turn(user="again", assistant="ok"))
    assert s.history() == [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "again"},
                           {"role": "assistant", "content": "ok"}]
    s.reset()
    assert s.history() == [] and s.system == "be brief"


def test_transcript_round_trip(tmp_path):
    s = session(system="sys", model="demo")
    s.set_option("threshold", "0.8")
    s.record(Turn(user="a", assistant="b", stats={"tokens": 2, "experts": {"summary": {}}},
                  settings={"threshold": 0.8}))
    s.record(Turn(user="c", assistant="d", interrupted=True))
    (tmp_path / "sub").mkdir()  # /save writes into a folder that exists (it creates none)
    path = s.save(tmp_path / "sub" / "chat.json")
    saved = json.loads(path.read_text())
    assert saved["format"] == "tide-chat" and saved["settings"]["threshold"] == 0.8
    t = session()
    t.load(path)
    a, b = s.to_dict(), t.to_dict()
    a.pop("saved_at"), b.pop("saved_at")
    b["model"] = a["model"]  # the model is the running one, not the transcript's
    assert a == b
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TideError, match="not a tide chat transcript"):
        t.load(tmp_path / "bad.json")


# ---- the app with a fake engine -----------------------------------------------------------------


class FakeTok:
    ids = SimpleNamespace(mask=MASK, eos=EOS)

    def token_text(self, tid):
        return f" w{tid}"

    def decode(self, ids):
        return "".join(self.token_text(t) for t in ids)


class FakeDecoder:
    """Two blocks of 4 generated tokens; `interrupt_after` raises Ctrl-C after that many steps."""

    def __init__(self, n_prompt, interrupt_after=None):
        self.n, self.cut = n_prompt, interrupt_after
        self.result = None
        self.tokens: list[int] = []

    def steps(self):
        start = self.n
        for b in range(2):
            for step, upto in enumerate((2, 4)):
                if self.cut is not None and len(self.tokens) >= self.cut:
                    raise KeyboardInterrupt
                blk = [10 + b * 4 + i if i < upto else MASK for i in range(4)]
                self.tokens = self.tokens[: b * 4] + [t for t in blk if t != MASK]
                yield SimpleNamespace(
                    block=b, step=step, global_step=b * 2 + step + 1,
                    block_start=start + 4 * b, gen_start=start, committed=[], edited=[],
                    block_tokens=blk, mask_id=MASK, forward_ms=1.0, elapsed_s=0.1,
                    tokens_done=len(self.tokens), block_done=upto == 4,
                    experts=LayerCounters(gpu_hits=8))
        self.result = self._result(True)

    def _result(self, finished):
        return GenerationResult(token_ids=list(self.tokens), steps=4, forwards=5,
                                wall_seconds=0.5, prompt_tokens=self.n, stopped_at_eos=False,
                                finished=finished)

    def stop_early(self):
        self.result = self._result(False)
        return self.result


class FakeEngine:
    def __init__(self):
        self.tokenizer = FakeTok()
        self.runtime = SimpleNamespace(name="resident", run_stats=ExpertStats(),
                                       reset_stats=self._reset)
        self.prompts = []
        self.interrupt_after = None
        self.fail: Exception | None = None
        self.notices: list[str] = []
        self.note_during_reply: str | None = None

    def _reset(self):
        st = ExpertStats(forwards=1)
        st.layer(1).gpu_hits = 30
        st.layer(1).cpu_calls = 10
        self.runtime.run_stats = st

    def prompt_ids(self, text, *, system=None, history=None, raw=False):
        self.prompts.append((text, system, list(history or [])))
        return [1, 2, 3]

    def decoder(self, ids, settings):
        if self.fail is not None:
            raise self.fail
        if self.note_during_reply:  # e.g. a compile that failed and fell back to eager
            self.notices.append(self.note_during_reply)
        return FakeDecoder(len(ids), self.interrupt_after)


@pytest.fixture
def app():
    out = io.StringIO()
    a = ChatApp(FakeEngine(), session(), out=Console(file=out, width=100, color_system=None),
                live=True)
    a.buf = out
    return a


def test_two_turns_carry_history_and_stats(app, capsys):
    assert app.handle("hello") and app.handle("and again")
    assert app.buf.getvalue() == " w10 w11 w12 w13 w14 w15 w16 w17\n" * 2
    text, system, history = app.engine.prompts[1]
    assert text == "and again" and history[0] == {"role": "user", "content": "hello"}
    assert history[1]["content"] == " w10 w11 w12 w13 w14 w15 w16 w17"
    assert app.handle("/stats")
    assert "75.0%" in app.buf.getvalue() and "25.0%" in app.buf.getvalue()
    err = capsys.readouterr().err
    assert "8 tokens, 4 steps" in err and "\x1b" not in err
    assert "expert hit" not in err  # the engine is not on a GPU: no hit rate in the line


def test_what_the_engine_notes_during_a_reply_is_said_once_after_it(app, capsys):
    app.engine.note_during_reply = "--compile auto: compiling the step failed (x); uncompiled"
    assert app.handle("hello")
    app.engine.note_during_reply = None
    assert app.handle("again")
    err = capsys.readouterr().err
    assert err.count("note: --compile auto: compiling the step failed") == 1
    assert not app.engine.notices


def test_ctrl_c_keeps_the_prefix_out_of_the_history(app, capsys):
    app.engine.interrupt_after = 6
    assert app.handle("long one")
    assert app.buf.getvalue() == " w10 w11 w12 w13 w14 w15\n"
    turn = app.session.turns[-1]
    assert turn.interrupted and turn.assistant == " w10 w11 w12 w13 w14 w15"
    assert "stopped after 6 committed tokens" in capsys.readouterr().err
    app.engine.interrupt_after = None
    assert app.handle("next")
    assert app.engine.prompts[-1][2] == []  # the interrupted exchange is not in the history


def test_drive_stops_between_steps_when_asked():
    dec = FakeDecoder(3)
    seen = []
    result, interrupted = drive(dec, seen.append, should_stop=lambda: len(seen) >= 3)
    assert interrupted and not result.finished and len(seen) == 3 and result.token_ids == [
        10, 11, 12, 13, 14, 15]


def test_errors_during_a_reply_are_one_line(app, capsys):
    app.engine.fail = OutOfDeviceMemory("the GPU ran out of memory", "lower --vram")
    assert app.handle("hi")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the GPU ran out of memory (hint: lower --vram)"]
    app.engine.fail = None
    assert app.handle("hi") and len(app.session.turns) == 1


def test_slash_commands(app, capsys):
    assert app.handle("/system You are terse.") and app.session.system == "You are terse."
    assert app.handle("/set threshold 0.9") and app.session.settings.threshold == 0.9
    assert app.handle("/set threshold 2") and app.session.settings.threshold == 0.9
    assert app.handle("/set") and app.handle("/help")
    assert app.handle("/frobnicate") and app.handle("/sytem x")
    assert app.handle("hi") and app.handle("/reset") and app.session.turns == []
    assert app.handle("/system off") and app.session.system is None
    assert app.handle("   ")
    assert app.handle("/exit") is False and app.handle("/quit") is False
    err = capsys.readouterr().err.splitlines()
    assert "threshold = 0.9" in err
    assert any(line.startswith("error: --threshold must be in (0, 1]") for line in err)
    assert "unknown command /frobnicate: /help lists the commands" in err
    assert "unknown command /sytem: did you mean /system? /help lists the commands" in err
    assert "threshold 0.9 · gen_length 16" in "\n".join(err)
    assert "/save FILE" in app.buf.getvalue()


def test_save_to_an_unwritable_path_is_one_line_and_the_session_goes_on(app, tmp_path,
                                                                         capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert app.handle("hi")
    capsys.readouterr()
    assert app.handle(f"/save {blocker}/chat.json")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {blocker}/chat.json")
    assert app.handle("/save") and "needs a file name" in capsys.readouterr().err
    assert app.handle("again") and len(app.session.turns) == 2
    assert app.handle(f"/save {tmp_path / 'ok.json'}")
    assert json.loads((tmp_path / "ok.json").read_text())["turns"][1]["user"] == "again"
    assert app.handle(f"/load {tmp_path / 'nope.json'}")
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("saved 2 turns") and err[-1].startswith("error: cannot read")


def test_loop_exits_cleanly_on_eof_and_ctrl_c(app):
    read, _ = reader(["hello", "/set gen_length 8"])
    app.loop(read, interactive=False)
    assert len(app.session.turns) == 1 and app.session.settings.gen_length == 8

    def interrupted(prompt):
        raise KeyboardInterrupt

    app.loop(interrupted)  # returns instead of raising


def test_a_ctrl_c_just_after_a_stopped_reply_does_not_quit(app, capsys, monkeypatch):
    """The second press of a double Ctrl-C lands at the prompt once the reply has stopped: it
    says how to quit instead of ending the conversation; a later Ctrl-C quits as before."""
    import tidecli.commands.chat_app as chat_app

    app.engine.interrupt_after = 6
    assert app.handle("long one")  # stopped by Ctrl-C
    app.engine.interrupt_after = None
    calls = []

    def read(prompt):
        calls.append(prompt)
        if len(calls) == 1:
            raise KeyboardInterrupt  # at once: the second press
        return "/exit" if len(calls) == 3 else "next"

    app.loop(read)
    assert len(calls) == 3 and len(app.session.turns) == 2  # went on: "next" was answered
    assert "the reply is already stopped; Ctrl-C again or Ctrl-D quits" in capsys.readouterr().err
    # long after a stopped reply, Ctrl-C at the prompt quits as before
    app.engine.interrupt_after = 2
    assert app.handle("again")
    now = chat_app.time.monotonic()
    monkeypatch.setattr(chat_app.time, "monotonic", lambda: now + chat_app.STOPPED_GRACE_S + 1)

    def interrupted(prompt):
        raise KeyboardInterrupt

    app.loop(interrupted)  # returns: the session ends


def test_a_ctrl_c_between_a_turn_and_the_next_prompt_counts_as_one_at_the_prompt(
        app, capsys, monkeypatch):
    """Python raises a Ctrl-C at its next check, which can be the loop's own jump back to the
    prompt, outside both of its handlers (a real terminal showed it: tests/test_chat_pty.py).
    Just after a stopped reply it keeps the session, as a press at the prompt does; later it
    ends it cleanly."""
    app.engine.interrupt_after = 6
    assert app.handle("long one")  # stopped by Ctrl-C
    app.engine.interrupt_after = None
    real, raised = app._turns, []

    def turns(read, interactive):
        if not raised:  # the press lands after the reply, before the prompt reads
            raised.append(1)
            raise KeyboardInterrupt
        return real(read, interactive)

    monkeypatch.setattr(app, "_turns", turns)
    lines = iter(["next", "/exit"])
    app.loop(lambda prompt: next(lines))
    assert raised and len(app.session.turns) == 2  # went on: "next" was answered
    assert "the reply is already stopped; Ctrl-C again or Ctrl-D quits" in capsys.readouterr().err
    raised.clear()
    app._stopped_at = None  # no reply stopped just now: the press ends the session
    app.loop(lambda prompt: pytest.fail("the session should have ended"))


def test_ctrl_c_in_a_slash_command_returns_to_the_prompt(app, capsys, monkeypatch):
    handled = []
    real = app.handle

    def handle(line):
        handled.append(line)
        if line == "/stats":
            raise KeyboardInterrupt  # while the command ran
        return real(line)

    monkeypatch.setattr(app, "handle", handle)
    read, _ = reader(["/stats", "hello", "/exit"])
    app.loop(read)
    assert handled == ["/stats", "hello", "/exit"] and len(app.session.turns) == 1
    assert "stopped; Ctrl-C again or Ctrl-D quits" in capsys.readouterr().err


def test_real_tiny_model_two_turns(tiny_ckpt, capsys):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), quiet=True)
    try:
        out = io.StringIO()
        s = ChatSession(settings=DecodeSettings(gen_length=12), max_positions=4096)
        a = ChatApp(eng, s, out=Console(file=out, width=80), info=eng.describe())
        assert a.handle("Hello") and a.handle("/set threshold 0.9") and a.handle("More")
        assert a.handle("/stats")
        assert len(s.turns) == 2 and all(t.stats["tokens"] == 12 for t in s.turns)
        per_layer = s.turns[-1].stats["experts"]["per_layer"]
        assert set(per_layer) == {str(i) for i in eng.cfg.moe_layers}
        assert "experts per MoE layer" in out.getvalue() and "\x1b" not in out.getvalue()
    finally:
        eng.close()


def test_load_keeps_the_options_given_on_the_command_line(tiny_ckpt, tmp_path, capsys,
                                                          monkeypatch):
    from helpers import tide

    saved = ChatSession(settings=DecodeSettings(gen_length=20, threshold=0.8))
    saved.record(Turn(user="hi", assistant="there"))
    path = saved.save(tmp_path / "t.json")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no input: the session ends at once
    code, _out, err = tide(["chat", "-m", str(tiny_ckpt), "--device", "cpu", "--load",
                            str(path), "--gen-length", "7"], capsys)
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("loaded 1 turn"))
    assert "gen_length 7" in line and "threshold 0.8" in line
    assert line.endswith("kept from the command line: gen_length")

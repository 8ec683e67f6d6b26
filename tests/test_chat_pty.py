"""The real `tide chat` in a pseudo-terminal on the demo model: turns, slash commands, Ctrl-C."""

from __future__ import annotations

import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")
if sys.platform == "win32":  # pragma: no cover
    pytest.skip("pexpect.spawn needs a POSIX pty", allow_module_level=True)

PROMPT = "you> "
# the demo model is written on first use into the test's TIDE_CACHE_DIR: allow for it
START_TIMEOUT = 180
TIMEOUT = 90


def spawn(*args: str):
    env = dict(os.environ, TERM="xterm", COLUMNS="100", LINES="30")
    child = pexpect.spawn(sys.executable, ["-m", "tidecli", "chat", *args], env=env,
                          dimensions=(30, 100), encoding="utf-8", codec_errors="replace",
                          timeout=TIMEOUT)
    child.expect_exact(PROMPT, timeout=START_TIMEOUT)
    return child


def ask(child, line: str, *expect: str) -> None:
    child.sendline(line)
    for text in expect:
        child.expect_exact(text)
    child.expect_exact(PROMPT)


def test_chat_turns_commands_and_ctrl_c_in_a_reply():
    child = spawn("--gen-length", "8")
    try:
        ask(child, "Hello", "tokens/s")
        ask(child, "How are you?", "tokens/s")
        ask(child, "/stats", "experts per MoE layer", "GPU hit")
        ask(child, "/set threshold 0.9", "threshold = 0.9")
        ask(child, "/set gen_length 2048", "gen_length = 2048")
        child.sendline("Tell me a very long story")
        child.expect_exact("steps/s")  # the live status line: the reply is being denoised
        child.sendintr()
        child.expect_exact("stopped after")
        child.expect_exact(PROMPT)
        ask(child, "/set gen_length 8")
        ask(child, "One more", "tokens/s")
        ask(child, "/nope", "unknown command /nope")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_ctrl_c_at_the_prompt_exits_cleanly():
    child = spawn()
    try:
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")

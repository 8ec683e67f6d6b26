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


def stop_a_long_reply(child) -> None:
    """Ask for a long reply, wait until it is being denoised, Ctrl-C it, and see it stop."""
    child.sendline("Tell me a very long story")
    child.expect_exact("steps/s")  # the live status line: the reply is being denoised
    child.sendintr()
    child.expect_exact("stopped after")


def test_chat_turns_commands_and_ctrl_c_in_a_reply():
    child = spawn("--gen-length", "8")
    try:
        ask(child, "Hello", "tokens/s")
        ask(child, "How are you?", "tokens/s")
        ask(child, "/stats", "experts per MoE layer", "GPU hit")
        ask(child, "/set threshold 0.9", "threshold = 0.9")
        ask(child, "/set gen_length 2048", "gen_length = 2048")
        stop_a_long_reply(child)
        child.expect_exact(PROMPT)
        ask(child, "/set gen_length 8")
        ask(child, "One more", "tokens/s")
        ask(child, "/nope", "unknown command /nope")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_a_double_ctrl_c_in_a_reply_keeps_the_session():
    """Ctrl-C twice in quick succession during a reply (as the help suggests to stop mid-step):
    the reply stops, and the second press, landing at the prompt, does not end the chat."""
    child = spawn("--gen-length", "2048")
    try:
        stop_a_long_reply(child)
        child.sendintr()  # the second press, once the reply has stopped: at (or near) the prompt
        child.expect_exact("Ctrl-C again or Ctrl-D quits")
        child.expect_exact(PROMPT)
        ask(child, "/set gen_length 8", "gen_length = 8")
        ask(child, "Hello", "tokens/s")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


def test_ctrl_c_at_the_prompt_exits_cleanly():
    child = spawn()
    try:
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


def test_keys_typed_during_a_reply_leave_no_stale_frame(tmp_path):
    """Typed ahead while a reply is drawn (with Enter): no copy of the live frame (its ░ marks)
    is left above the reply, and the typed line becomes the next message."""
    import shutil
    import subprocess
    import time

    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("needs tmux")
    name = f"tide-{os.getpid()}"
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TIDE_CACHE_DIR", "TIDE_CONFIG_DIR",
                                                     "OMP_NUM_THREADS") if k in os.environ)
    cmd = f"env {env} {sys.executable} -m tidecli chat --gen-length 64 --threshold 0.999"

    def screen() -> str:
        return subprocess.run([tmux, "capture-pane", "-t", name, "-p", "-S", "-300"],
                              capture_output=True, text=True).stdout

    def wait_for(pred, limit: float) -> str:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            text = screen()
            if pred(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"timed out; screen:\n{screen()}")

    subprocess.run([tmux, "new-session", "-d", "-s", name, "-x", "80", "-y", "20", cmd],
                   check=True)
    try:
        wait_for(lambda t: PROMPT.rstrip() in t, START_TIMEOUT)  # tmux trims trailing blanks
        subprocess.run([tmux, "send-keys", "-t", name, "Tell me a long story", "Enter"])
        wait_for(lambda t: "steps/s" in t, TIMEOUT)  # the live frame is drawn
        subprocess.run([tmux, "send-keys", "-t", name, "typed ahead", "Enter"])
        text = wait_for(lambda t: t.count(" steps (") >= 2 and  # both summaries, then a prompt
                        t.rstrip().splitlines()[-1] == PROMPT.rstrip(), 2 * TIMEOUT)
    finally:
        subprocess.run([tmux, "kill-session", "-t", name], capture_output=True)
    assert "░" not in text, text
    assert f"{PROMPT}typed ahead" in text

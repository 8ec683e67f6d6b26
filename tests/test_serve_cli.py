"""The `tide serve` command: a real process stopped by SIGINT/SIGTERM mid-generation, and the
one-line errors it gives before any model loads."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from helpers import user_error

WAIT_S = 60.0


def start(ckpt, tmp_path) -> tuple[subprocess.Popen, str, queue.Queue]:
    env = {k: v for k, v in os.environ.items() if k != "TIDE_API_KEY"}
    env = {**env, "TIDE_CACHE_DIR": str(tmp_path / "cache"),
           "TIDE_CONFIG_DIR": str(tmp_path / "config"), "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidecli", "serve", "-m", str(ckpt), "--device", "cpu",
         "--port", "0", "--gen-length", "16"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            pytest.fail("tide serve did not announce its address")
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if found:
            return proc, found.group(1), lines


def rest(lines: queue.Queue) -> str:
    out = []
    while not lines.empty():
        out.append(lines.get())
    return "".join(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_after_the_current_step_and_exits_0(tiny_ckpt, tmp_path, sig):
    proc, base, lines = start(tiny_ckpt, tmp_path)
    try:
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model="t", messages=[{"role": "user", "content": "Hello"}], stream=True,
            max_tokens=3000, extra_body={"threshold": 1.0})
        got = []
        with pytest.raises(openai.APIError, match="shutting down"):
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got.append(chunk.choices[0].delta.content)
                    if len(got) == 1:
                        proc.send_signal(sig)
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = rest(lines)
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    assert f"stopped ({name})" in err and "Traceback" not in err, err


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tiny_ckpt, tmp_path):
    """Two quick SIGINTs (an impatient Ctrl-C): the server stops at once, and the cut lifespan
    is no traceback on the terminal."""
    proc, base, lines = start(tiny_ckpt, tmp_path)
    try:
        assert httpx.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    time.sleep(0.2)  # the reader thread drains stderr
    err = rest(lines)
    assert "stopped (SIGINT)" in err and "Traceback" not in err, err


def test_missing_extra_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import fails as when not installed
    user_error(["serve", "-m", "nowhere"], capsys, "tide serve needs FastAPI and uvicorn",
               hint="pip install 'tide-dllm[serve]'")


def test_port_in_use_fails_before_loading(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        user_error(["serve", "-m", "nowhere", "--port", str(port)], capsys,
                   f"cannot listen on 127.0.0.1:{port}", hint="--port")


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--api-key", " "], "--api-key is empty"),
])
def test_bad_options(capsys, args, message):
    user_error(["serve", "-m", "nowhere", *args], capsys, message)


def test_api_key_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("TIDE_API_KEY", " ")  # an empty one counts as unset
    user_error(["serve", "-m", "nowhere"], capsys, "--api-key is empty")


def test_a_failed_worker_stops_the_server_with_one_line(tiny_ckpt, capsys, monkeypatch):
    """The worker thread itself failing (not a generation: those answer their request) must not
    leave a server that answers 503 forever: it stops, and the command says why, exit 1."""
    from tidecli.serve.worker import Worker

    def broken(self):
        raise RuntimeError("no device for this thread")

    monkeypatch.setattr(Worker, "_next", broken)
    done = threading.Event()
    timer = threading.Timer(WAIT_S, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()  # a bound: a server that did not stop is interrupted, and the test fails
    try:
        user_error(["serve", "-m", str(tiny_ckpt), "--device", "cpu", "--port", "0"], capsys,
                   "the generation worker stopped: RuntimeError: no device for this thread",
                   hint="TIDE_DEBUG=1")
        done.set()
    finally:
        timer.cancel()
    assert done.is_set()

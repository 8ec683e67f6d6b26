"""The command-line surface through the real entry point: usage errors (exit 2, the usage line
and one error line), help (`tide` alone, -h everywhere, choices and defaults named), the Hub
when it cannot be reached, and option checks that fail before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import tide

COMMANDS = ("generate", "chat", "serve", "plan", "profile", "bench", "synth")


def _tide_argv() -> list[str]:
    """The installed `tide` script beside this Python when there is one, else `-m tidecli`."""
    script = Path(sys.executable).with_name("tide")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tidecli"]


def _run(*args: str, env: dict | None = None, timeout: float = 60):
    return subprocess.run([*_tide_argv(), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# ---- usage errors: exit 2, usage line, one error line, no "internal error" -------------------


@pytest.mark.parametrize("argv,message,usage", [
    (["foo"], "no such command 'foo'", "tide"),
    (["generate"], "missing argument", "tide generate"),
    (["generate", "hi", "--gen-length", "abc"], "invalid value for '--gen-length'",
     "tide generate"),
    (["plan", "--vram"], "option '--vram' requires an argument", "tide plan"),
    (["plan", "--bogus"], ("no such option", "--bogus"), "tide plan"),
    (["bench", "--experts"], ("no such option", "--experts"), "tide bench"),
])
def test_usage_errors_exit_2_with_the_usage_line(capsys, argv, message, usage):
    code, out, err = tide(argv, capsys)
    assert code == 2, err
    assert out == "" and "internal error" not in err and "Traceback" not in err
    lines = err.strip().splitlines()
    if usage is not None:
        assert lines[0].startswith(f"Usage: {usage} "), err
    assert lines[-2].startswith("error: "), err
    for text in (message,) if isinstance(message, str) else message:  # click words vary
        assert text in lines[-2], err
    assert lines[-1].startswith("hint: `tide") and "--help" in lines[-1], err
    assert sum(line.startswith("error:") for line in lines) == 1


def test_tide_alone_prints_help_and_exits_0(capsys):
    code, out, err = tide([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("Usage: tide") and all(c in out for c in COMMANDS)


@pytest.mark.parametrize("argv", [["-h"], *[[c, "-h"] for c in COMMANDS]])
def test_dash_h_is_help_everywhere(capsys, argv):
    code, out, err = tide(argv, capsys)
    assert code == 0 and err == "", err
    assert out.startswith("Usage: tide") and "--help" in out


def test_the_command_list_is_whole_and_in_order(capsys):
    _code, out, _err = tide(["--help"], capsys)
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == list(COMMANDS)
    assert "…" not in out and "..." not in out.split("Commands:")[1]


@pytest.mark.parametrize("command,shown", [
    ("generate", ["[auto|resident|lru|static|tide]", "[auto|stream|split|cpu|gpu]",
                  "[auto|cuda|cpu]", "[auto|bf16|fp32|fp16]", "Default: demo"]),
    ("chat", ["[auto|resident|lru|static|tide]", "Default: demo"]),
    ("plan", ["[auto|stream|split|cpu|gpu]", "Default: demo", "--verbose", "-o, --output"]),
    ("bench", ["--experts-per-layer", "-o, --output", "Default: demo"]),
    ("profile", ["-o, --output", "--list"]),
    ("synth", ["[tiny|mini|flash|tiny22|flash22]"]),
])
def test_help_names_choices_and_the_default_model(capsys, command, shown):
    code, out, _err = tide([command, "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())  # help text wraps at the terminal's width
    for text in shown:
        assert text in flat, (command, text)


def test_policy_choices_match_the_runtime():
    from tidecli.commands.options import PolicyOpt
    from tidecli.experts.modes import POLICIES
    from tidecli.runtime.options import POLICY_CHOICES

    assert POLICY_CHOICES == ("auto", *POLICIES)
    assert PolicyOpt.__metadata__[0].metavar == f"[{'|'.join(POLICY_CHOICES)}]"


def test_the_real_entry_point():
    res = _run()
    assert res.returncode == 0 and res.stdout.startswith("Usage: tide"), res.stderr
    res = _run("-h")
    assert res.returncode == 0 and "generate" in res.stdout, res.stderr
    res = _run("generate")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines()[0].startswith("Usage: tide generate")
    assert "error: missing argument" in res.stderr and "internal error" not in res.stderr


def test_no_args_in_a_pty_prints_help():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(_tide_argv()[0], _tide_argv()[1:], encoding="utf-8", timeout=60,
                          env={**os.environ, "COLUMNS": "100"})
    child.expect_exact("Commands:")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_without_the_click_package_usage_errors_still_map():
    """Recent typer versions carry their own click: the mapping must not need the package."""
    pytest.importorskip("typer._click", reason="this typer uses the click package")
    code = ("import sys; sys.modules['click'] = None\n"
            "from tidecli.cli import main\n"
            "main(['generate', 'x', '--gen-length', 'abc'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert "error: invalid value for '--gen-length'" in res.stderr


# ---- the Hub, unreachable ------------------------------------------------------------------


def test_an_unreachable_hub_is_said_at_once_without_library_noise(tmp_path):
    """No HF_HUB_OFFLINE, and an endpoint that refuses connections (this machine's loopback):
    the documented message within seconds, nothing of huggingface_hub's on stderr."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    res = subprocess.run([*_tide_argv(), "plan", "-m", "no-such-org/no-such-model",
                          "-p", "rtx4090"], capture_output=True, text=True, timeout=120,
                         env=env)
    took = time.perf_counter() - start
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == [
        "error: cannot download no-such-org/no-such-model: the Hub is unreachable",
        "hint: connect to the internet, or download the checkpoint elsewhere and pass its "
        "folder to --model"], res.stderr
    assert took < 8, took


def test_a_hub_that_never_answers_is_given_up_quickly(monkeypatch, capsys):
    import socket

    import tidecli.model.resolve as resolve

    def hang(*a, **kw):
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(resolve, "HUB_PROBE_S", 0.3)
    start = time.perf_counter()
    code, _out, err = tide(["plan", "-m", "no-such-org/no-such-model", "-p", "rtx4090"], capsys)
    assert code == 1 and "the Hub is unreachable" in err
    assert time.perf_counter() - start < 3


class EntryNotFoundError(Exception):
    pass


class LocalEntryNotFoundError(FileNotFoundError, EntryNotFoundError):  # huggingface_hub's names
    pass


class RepositoryNotFoundError(Exception):
    pass


class GatedRepoError(RepositoryNotFoundError):
    pass


def test_hub_errors_say_what_happened():
    from tidecli.model.resolve import _hub_error

    # a file missing from the local cache after a failed connection is not a misspelt name
    assert "unreachable" in _hub_error("a/b", LocalEntryNotFoundError("x")).message
    assert "was not found" in _hub_error("a/b", RepositoryNotFoundError("x")).message
    assert "gated" in _hub_error("a/b", GatedRepoError("x")).message


# ---- option values fail before torch loads --------------------------------------------------


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["generate", "hi", "--policy", "fast"], "unknown policy 'fast'"),
    (["chat", "--device", "tpu"], "unknown device 'tpu'"),
    (["chat", "--misses", "nowhere"], "unknown --misses 'nowhere'"),
    (["generate", "hi", "--prefetch", "next"], "unknown --prefetch 'next'"),
    (["bench", "--prefetch", "off,next"], "unknown --prefetch 'next'"),
    (["generate", "hi", "--tau", "0"], "--tau must be at least 1"),
    (["plan", "--vram", "8,x"], "--vram"),
    (["bench", "--policies", "fast"], "unknown policy"),
    (["bench", "--experts-per-layer", "0"], "at least 1"),
    (["synth", "out", "--preset", "huge"], "unknown preset 'huge'"),
    (["plan", "-p", "rtx4090", "--vram", "0"], "--vram must be a positive number"),
    (["bench", "--vram", "10,0"], "--vram must be a positive number"),
    (["bench", "--vram", "ten"], "--vram: 'ten' is not a number of GiB"),
])
def test_wrong_values_fail_before_torch_is_imported(argv, message):
    code = ("import sys\nfrom tidecli.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert 'torch' not in sys.modules, 'torch imported'\n    raise\n")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert "torch imported" not in res.stderr

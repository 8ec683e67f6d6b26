import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tidecli.cli import app, main

runner = CliRunner()


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from tidecli.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'transformers' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for cmd in ("generate", "synth"):
        assert cmd in out.stdout


def test_version():
    from tidecli import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.stdout


def _main(argv, capsys):
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_generate_json_fields_and_stderr_summary(tiny_ckpt, capsys):
    code, out, err = _main(["generate", "Hello", "--model", str(tiny_ckpt), "--gen-length", "12",
                            "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    for key in ("text", "token_ids", "steps", "tokens_per_step", "tokens_per_second",
                "wall_seconds", "model", "policy"):
        assert key in obj
    assert len(obj["token_ids"]) == 12 and obj["steps"] >= 1
    assert "tokens/s" in err and "steps" in err


def test_generate_text_on_stdout(tiny_ckpt, capsys):
    code, out, err = _main(["generate", "Hello", "-m", str(tiny_ckpt), "--gen-length", "6"],
                           capsys)
    assert code == 0 and out.strip() and "tokens/s" in err and "tokens/s" not in out


@pytest.mark.parametrize("policy,note", [
    ("tide", "--prefetch layer reads ahead only for streamed misses; these run cpu"),
    ("lru", "ignored --prefetch (they apply to other policies than lru)")])
def test_a_read_ahead_that_cannot_run_is_said_once(tiny_ckpt, capsys, policy, note):
    """On a CPU device misses do not stream: the run goes on without read-ahead, and says so
    in one note (not once from the options and again from the runtime)."""
    code, out, err = _main(["generate", "Hello", "-m", str(tiny_ckpt), "--gen-length", "6",
                            "--policy", policy, "--experts-per-layer", "4", "--prefetch",
                            "layer", "--json"], capsys)
    assert code == 0, err
    assert note in err and err.count("--prefetch") == 1, err
    assert json.loads(out)["expert_stats"]["summary"]["prefetched"] == 0


def test_bad_model_is_one_line_and_exit_1(capsys, tmp_path):
    code, out, err = _main(["generate", "Hi", "--model", str(tmp_path / "nope")], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: model folder") and lines[1].startswith("hint:")
    assert "Traceback" not in err


def test_out_of_range_options_exit_1(tiny_ckpt, capsys):
    code, _, err = _main(["generate", "Hi", "-m", str(tiny_ckpt), "--threshold", "1.5"], capsys)
    assert code == 1 and "--threshold must be in (0, 1]" in err
    code, _, err = _main(["generate", "Hi", "-m", str(tiny_ckpt), "--block-length", "30"], capsys)
    assert code == 1 and "does not divide" in err
    code, _, err = _main(["generate", "   ", "-m", str(tiny_ckpt)], capsys)
    assert code == 1 and "empty" in err


def test_demo_is_the_default_model(capsys):
    code, out, err = _main(["generate", "Hello", "--gen-length", "4", "--json"], capsys)
    assert code == 0, err
    assert "demo" in json.loads(out)["model"] and json.loads(out)["demo"] is True


def test_the_demo_says_what_it_is_and_replies_short(capsys, tiny_ckpt):
    from tidecli.commands.options import DEMO_GEN_LENGTH, GEN_LENGTH, reply_length

    code, out, err = _main(["generate", "Hello"], capsys)
    assert code == 0, err
    assert "demo: random weights, for trying the tool" in err  # the summary line
    code, out, _ = _main(["generate", "Hello", "--json"], capsys)
    assert len(json.loads(out)["token_ids"]) <= DEMO_GEN_LENGTH < GEN_LENGTH
    assert reply_length(None, None) == reply_length(None, "demo") == DEMO_GEN_LENGTH
    assert reply_length(None, str(tiny_ckpt)) == GEN_LENGTH
    assert reply_length(7, "demo") == 7  # given: as given
    code, out, err = _main(["generate", "Hello", "-m", str(tiny_ckpt), "--json"], capsys)
    assert code == 0 and "demo" not in json.loads(out)
    assert "demo:" not in err


def test_synth_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    code, _, err = _main(["synth", str(tmp_path / "x"), "--layers", "2"], capsys)
    assert code == 1 and "--force" in err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"

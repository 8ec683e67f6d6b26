"""Helpers for the fault suites: run the real CLI in-process and check its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tidecli.cli import main


def tide(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    cap = capsys.readouterr()
    return exit_info.value.code, cap.out, cap.err


def user_error(argv: list[str], capsys, message: str, *, contains: str = "",
               hint: str = "") -> str:
    """Run the CLI, expect exit 1 ending in `error: <message>...` + `hint: ...`; returns both."""
    code, out, err = tide(argv, capsys)
    assert code == 1, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert lines[-2].startswith(f"error: {message}"), err
    assert contains in lines[-2], err
    assert lines[-1].startswith("hint: ") and hint in lines[-1], err
    return "\n".join(lines[-2:])


def clone(src: Path, dst: Path, *, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder sharing `src`'s files (symlinks), with real copies of `copy` and of
    every small file, so those can be changed without touching the session fixture."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in copy and f.name.endswith(".safetensors"):
            try:
                (dst / f.name).symlink_to(f)
                continue
            except OSError:  # no symlinks here (Windows without the privilege): copy
                pass
        shutil.copyfile(f, dst / f.name)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "Hello", "-m", str(model), "--device", "cpu", "--gen-length", "4",
            *extra]



"""Atomic writes and the user's cache/config folders. Nothing here imports torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tidecli.errors import TideError


def _xdg(env: str, fallback: str) -> Path:
    value = os.environ.get(env)
    if value:
        return Path(value)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base)
    if sys.platform == "darwin" and env == "XDG_CACHE_HOME":
        return Path.home() / "Library" / "Caches"
    return Path.home() / fallback


def cache_dir() -> Path:
    """Where built-in models (demo) live. TIDE_CACHE_DIR overrides."""
    override = os.environ.get("TIDE_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "tide"


def config_dir() -> Path:
    """Where saved hardware profiles live. TIDE_CONFIG_DIR overrides."""
    override = os.environ.get("TIDE_CONFIG_DIR")
    return Path(override) if override else _xdg("XDG_CONFIG_HOME", ".config") / "tide"


def _write_failed(path: Path, exc: OSError) -> TideError:
    return TideError(
        f"cannot write {path}: {exc.strerror or exc}",
        "choose a folder you can write to, or free some disk space",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a file path the user gave that cannot be written: its folder
    must exist (it is not created) and the path must not be a folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise TideError(f"cannot write {target}: it is a folder", "give a file name")
    if not target.parent.exists():
        raise TideError(f"cannot write {target}: the folder {target.parent} does not exist",
                        "create it first, or choose another path")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise TideError(f"cannot write {target}: {target.parent} is not a folder you can write "
                        "to", "choose a folder you can write to")
    return target


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *,
                       make_parents: bool = False) -> Path:
    """Write to a temporary file beside `path`, fsync, then rename over it. The file gets the
    mode the user's umask gives. A missing folder is created only for tide's own files
    (`make_parents`); a path the user gave must be in a folder that exists."""
    target = Path(path)
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        elif not target.parent.exists():
            raise TideError(f"cannot write {target}: the folder {target.parent} does not exist",
                            "create it first, or choose another path")
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _write_failed(target, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str, *, make_parents: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), make_parents=make_parents)


def atomic_write_json(path: str | os.PathLike, obj: object, *,
                      make_parents: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n",
                             make_parents=make_parents)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place only on success.

    An existing non-empty `target` is refused unless `force`; with `force` the old folder is
    replaced only after the new one is complete, so a failure never leaves half a folder
    under the target name.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise TideError(f"{target} exists and is not a folder", "choose another output path")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise TideError(
            f"{target} already exists and is not empty",
            "choose another folder, or pass --force to replace it",
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    except OSError as exc:
        raise _write_failed(target, exc) from exc
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous folder back under its name
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""The fault suite, while running and writing: too little RAM, pinning failing and the GPU
running out of memory mid-step (all simulated), a corrupt saved profile, and writes that fail
half-way (full disk, Ctrl-C, unwritable paths) leaving the old file or nothing behind.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from tidecli.errors import TideError
from tidecli.model.checkpoint import Checkpoint

from helpers import gen, tide, user_error

# ---- host memory --------------------------------------------------------------------------------


def test_ram_too_small_for_the_host_store(tiny_ckpt, monkeypatch):
    import psutil

    from tidecli.experts.store import HostExpertStore

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(
        available=1 << 30, total=2 << 30, percent=50.0))
    with pytest.raises(TideError, match=r"^the routed experts need .* GiB of RAM") as info:
        HostExpertStore(Checkpoint.open(tiny_ckpt), pin=False)
    assert info.value.hint and "\n" not in info.value.message


def test_ram_too_small_for_any_host_tier_on_the_cli(tiny_ckpt, monkeypatch, capsys):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(
        available=1 << 30, total=2 << 30, percent=50.0))
    user_error(gen(tiny_ckpt, "--policy", "lru", "--experts-per-layer", "8"), capsys,
               "the routed experts need", hint="RAM")


def test_pinned_allocation_failing_falls_back_to_pageable(tiny_ckpt, monkeypatch):
    from tidecli.experts import store as store_mod

    real = store_mod.allocate_host

    def allocate(shape, dtype, *, pin):
        if pin:
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ...")
        return real(shape, dtype, pin=False)

    monkeypatch.setattr(store_mod, "allocate_host", allocate)
    ckpt = Checkpoint.open(tiny_ckpt)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pinned = store_mod.HostExpertStore(ckpt, pin=True)
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and msgs[0].startswith(
        "pinned host memory is not available (CUDA error: out of memory); experts use pageable")
    assert not pinned.pinned and pinned.info.pin_error == "CUDA error: out of memory"
    plain = store_mod.HostExpertStore(ckpt, pin=False)
    layer = ckpt.config.moe_layers[-1]
    assert torch.equal(pinned.expert(layer, 5), plain.expert(layer, 5))


def test_warnings_are_one_line_on_the_cli(tiny_ckpt, monkeypatch, capsys):
    import tidecli.runtime.engine

    def resolve(spec, **kw):
        warnings.warn("pinned host memory is not available (x); experts use pageable memory",
                      RuntimeWarning, stacklevel=2)
        raise TideError("stop here", "nothing")

    monkeypatch.setattr(tidecli.runtime.engine, "resolve_model", resolve)
    code, _, err = tide(gen(tiny_ckpt), capsys)
    assert code == 1 and err.splitlines() == [
        "warning: pinned host memory is not available (x); experts use pageable memory",
        "error: stop here", "hint: nothing"]


# ---- the GPU running out of memory during a step (simulated) ------------------------------------


def oom_on_call(runtime, n: int, monkeypatch) -> None:
    """Make the expert runtime raise torch's out-of-memory error on its n-th call (mid-pass)."""
    real, calls = runtime.run, [0]

    def run(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **kw)

    monkeypatch.setattr(runtime, "run", run)


def test_out_of_memory_during_generate(tiny_ckpt, monkeypatch, capsys):
    from tidecli.experts.runtime import ResidentRuntime

    def run(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ResidentRuntime, "run", run)
    user_error(gen(tiny_ckpt), capsys, "the GPU ran out of memory", hint="--vram")


@pytest.fixture(scope="module")
def reference_answer(tiny_ckpt):
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import drive
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), quiet=True)
    try:
        result, _ = drive(eng.decoder(eng.prompt_ids("Hello"), DecodeSettings(gen_length=4)))
        return eng.tokenizer.decode(result.token_ids)
    finally:
        eng.close()


@pytest.mark.parametrize("policy", ["resident", "lru"])
def test_out_of_memory_in_chat_leaves_the_session_usable(tiny_ckpt, reference_answer,
                                                          monkeypatch, capsys, policy):
    from tidecli.commands.chat_app import ChatApp
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import ChatSession
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    opts = engine_options(model=str(tiny_ckpt), device="cpu", policy=policy,
                         experts_per_layer=8 if policy == "lru" else None)
    eng = Engine(opts, quiet=True)
    try:
        session = ChatSession(settings=DecodeSettings(gen_length=4), max_positions=4096)
        app = ChatApp(eng, session, out=Console(file=io.StringIO(), width=80), live=False)
        oom_on_call(eng.runtime, 5, monkeypatch)  # the second forward pass, second MoE layer
        assert app.handle("Hello")
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: the GPU ran out of memory during this reply (hint: /set "
                       "gen_length smaller or /reset, or restart with a lower --vram or "
                       "--experts-per-layer)"]
        assert session.turns == []
        assert app.handle("Hello") and len(session.turns) == 1
        assert session.turns[0].assistant == reference_answer  # same tokens as undisturbed
    finally:
        eng.close()


# ---- saved profiles -----------------------------------------------------------------------------


def test_corrupt_saved_profile(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from tidecli.hardware.store import saved_profile_path

    monkeypatch.setenv("TIDE_CONFIG_DIR", str(tmp_path / "cfg"))
    path = saved_profile_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "half a profi')
    user_error(["plan", "-m", str(tiny_ckpt)], capsys, f"the hardware profile {path} is corrupt",
               hint="delete it and run `tide profile` again")
    assert path.read_text() == '{"name": "half a profi'  # left for the user to look at


# ---- writes that must not be left half done -----------------------------------------------------


def enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_profile_and_transcript_writes_keep_the_old_file(tmp_path, monkeypatch):
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import ChatSession
    from tidecli.hardware.profile import HardwareProfile, load_profile_file

    prof, chat = tmp_path / "p.json", tmp_path / "chat.json"
    HardwareProfile(name="old").save(prof)
    session = ChatSession(settings=DecodeSettings())
    session.save(chat)
    before = {p: p.read_bytes() for p in (prof, chat)}
    monkeypatch.setattr(os, "fsync", enospc)  # the disk fills up half-way through a write
    with pytest.raises(TideError, match="cannot write .*p.json: No space left on device"):
        HardwareProfile(name="new").save(prof)
    session.set_system("new")
    with pytest.raises(TideError, match="cannot write .*chat.json: No space left on device"):
        session.save(chat)
    assert {p: p.read_bytes() for p in (prof, chat)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", "p.json"]
    assert load_profile_file(prof).name == "old"


@pytest.mark.parametrize("where", ["parent_is_a_file", "target_is_a_folder", "disk_full"])
def test_save_to_an_unwritable_path(tmp_path, monkeypatch, capsys, where):
    from tidecli.commands.chat_app import ChatApp
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import ChatSession

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    target = {"parent_is_a_file": tmp_path / "a_file" / "chat.json",
              "target_is_a_folder": tmp_path / "a_folder",
              "disk_full": tmp_path / "chat.json"}[where]
    real_fsync = os.fsync
    if where == "disk_full":
        monkeypatch.setattr(os, "fsync", enospc)
    app = ChatApp(SimpleNamespace(), ChatSession(settings=DecodeSettings()),
                  out=Console(file=io.StringIO()))
    assert app.handle(f"/save {target}")  # the session goes on
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {target}: ")
    assert "(hint: choose a folder you can write to" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]
    assert list((tmp_path / "a_folder").iterdir()) == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert app.handle(f"/save {tmp_path / 'ok.json'}") and (tmp_path / "ok.json").is_file()


def failing_write_shard(exc: BaseException):
    """write_shard that writes the first shard, then half of the second and fails."""
    from tidecli.model import synth

    real, calls = synth.write_shard, [0]

    def write(path, entries, tensors, **kw):
        calls[0] += 1
        if calls[0] == 1:
            return real(path, entries, tensors, **kw)
        Path(path).write_bytes(b"\0" * 1000)
        raise exc

    return write


@pytest.mark.parametrize("exc,code,message", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "error: cannot write {out}: No space left on device"),
])
@pytest.mark.parametrize("existing", [False, True])
def test_synth_interrupted_or_out_of_disk(tmp_path, monkeypatch, capsys, exc, code, message,
                                          existing):
    from tidecli.model import synth

    out = tmp_path / "out"
    if existing:  # --force over an earlier folder: it must survive the failure
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(synth, "write_shard", failing_write_shard(exc))
    got, _, err = tide(["synth", str(out), "--layers", "2", "--device", "cpu", "--force"],
                       capsys)
    assert got == code and "Traceback" not in err
    assert err.strip().splitlines()[-1 if code == 130 else -2] == message.format(out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_synth_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(
        total=10 << 30, used=10 << 30, free=1 << 20))
    user_error(["synth", str(tmp_path / "out"), "--layers", "2", "--device", "cpu"], capsys,
               "not enough disk space for a", hint="free some space")
    assert list(tmp_path.iterdir()) == []




@pytest.mark.parametrize("ram", ["nan", "-1"])
def test_bad_ram_is_refused_whatever_the_policy(tiny_ckpt, capsys, ram):
    """Even the resident policy, which keeps no host store, refuses a nonsense --ram."""
    user_error(gen(tiny_ckpt, "--ram", ram), capsys, "--ram must be positive", hint="--ram")


def test_user_files_are_not_written_into_missing_folders_and_follow_the_umask(tmp_path, capsys):
    from tidecli.commands.chat_app import ChatApp
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import ChatSession

    app = ChatApp(SimpleNamespace(), ChatSession(settings=DecodeSettings()),
                  out=Console(file=io.StringIO()))
    missing = tmp_path / "nope" / "chat.json"
    assert app.handle(f"/save {missing}")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and not missing.parent.exists()
    old = os.umask(0o022)
    try:
        assert app.handle(f"/save {tmp_path / 'chat.json'}")
    finally:
        os.umask(old)
    assert (tmp_path / "chat.json").stat().st_mode & 0o777 == 0o644


def test_an_unwritable_trace_path_fails_before_the_generation(tiny_ckpt, capsys, tmp_path,
                                                              monkeypatch):
    import tidecli.runtime.engine as engine

    def never(*a, **k):  # the engine must not even be built
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.Engine, "__init__", never)
    user_error(gen(tiny_ckpt, "--trace", str(tmp_path / "no" / "t.npz")), capsys,
               f"cannot write {tmp_path / 'no' / 't.npz'}: the folder", hint="create it")


def test_tau_zero_is_refused_not_replaced(tiny_ckpt, capsys):
    user_error(gen(tiny_ckpt, "--policy", "tide", "--tau", "0"), capsys,
               "--tau must be at least 1, got 0", hint="--tau")

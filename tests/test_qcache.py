"""The compressed expert cache (experts/qcache.py): reused on the next start, a damaged one
detected, rebuilt and said in one notice, a changed checkpoint not mistaken for the cached one,
and a full disk handled (no cache, or a one-line error where the cache is needed)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple

import pytest
import torch

from tidecli.errors import TideError
from tidecli.experts import qcache, qstore
from tidecli.experts.formats import expert_format
from tidecli.experts.qcache import DATA, MANIFEST, cache_folder, ensure_cache, open_cache
from tidecli.experts.qstore import CompressedHostStore, CompressedTieredStore, load_compressed_pools
from tidecli.memory import host_tiers
from tidecli.model.checkpoint import Checkpoint
from tidecli.units import GIB

from helpers import clone

CPU = torch.device("cpu")


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path, monkeypatch):
    """A checkpoint of its own (so its cache is its own) in a cache folder of its own."""
    monkeypatch.setenv("TIDE_CACHE_DIR", str(tmp_path / "cache"))
    return Checkpoint.open(clone(tiny_ckpt, tmp_path / "model"))


def _fmt(ckpt, name="int4"):
    cfg = ckpt.config
    return expert_format(name, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)


def _store(ckpt, fmt, notices):
    return CompressedHostStore(ckpt, fmt, pin=False, device=CPU, notices=notices)


def _no_quantizing(*a, **k):
    raise AssertionError("quantized again although the cache is good")


def test_the_second_start_reads_the_cache(ckpt, monkeypatch):
    fmt = _fmt(ckpt)
    notices: list[str] = []
    first = _store(ckpt, fmt, notices)
    assert notices == []
    folder = cache_folder(ckpt, fmt)
    assert (folder / DATA).stat().st_size == 3 * 32 * fmt.row_bytes
    monkeypatch.setattr(qstore, "quantized_chunks", _no_quantizing)
    second = _store(ckpt, fmt, notices)
    assert notices == []
    for layer in ckpt.config.moe_layers:
        assert torch.equal(first.layers[layer], second.layers[layer])
    pools = load_compressed_pools(ckpt, fmt, device=CPU, notices=notices)
    assert notices == [] and torch.equal(pools[1], first.layers[1])
    assert not list(folder.parent.glob(".*partial*"))  # nothing half-written left behind


def _corrupt(folder, at):
    with open(folder / DATA, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "manifest", "other key"])
def test_a_damaged_cache_is_rebuilt_and_said_once(ckpt, damage):
    fmt = _fmt(ckpt)
    good = _store(ckpt, fmt, [])
    folder = cache_folder(ckpt, fmt)
    if damage == "flipped byte":  # layer 2, expert 5
        _corrupt(folder, (1 * 32 + 5) * fmt.row_bytes + 100)
        why = "layer 2, expert 5: checksum mismatch"
    elif damage == "truncated":
        with open(folder / DATA, "r+b") as fh:
            fh.truncate(1000)
        why = f"{DATA} holds 1000 bytes"
    elif damage == "manifest":
        (folder / MANIFEST).write_text("{not json")
        why = "manifest is missing or unreadable"
    else:
        m = json.loads((folder / MANIFEST).read_text())
        m["key"] = "0" * 64
        (folder / MANIFEST).write_text(json.dumps(m))
        why = "does not match"
    notices: list[str] = []
    again = _store(ckpt, fmt, notices)
    assert len(notices) == 1 and "was damaged" in notices[0] and why in notices[0], notices
    assert "rebuilt" in notices[0]
    for layer in ckpt.config.moe_layers:
        assert torch.equal(again.layers[layer], good.layers[layer])
    cache, problem = open_cache(ckpt, fmt)
    assert cache is not None and problem is None
    cache.close()


def test_a_changed_checkpoint_gets_a_new_cache(ckpt):
    fmt = _fmt(ckpt)
    _store(ckpt, fmt, [])
    old = cache_folder(ckpt, fmt)
    shard = sorted(ckpt.folder.glob("model-*.safetensors"))[-1]
    real = shard.resolve()
    shard.unlink()
    shutil.copyfile(real, shard)  # same bytes, a new file: another identity
    os.utime(shard, ns=(1, 1))
    ckpt2 = Checkpoint.open(ckpt.folder)
    assert cache_folder(ckpt2, fmt) != old
    notices: list[str] = []
    _store(ckpt2, fmt, notices)
    assert notices == [] and cache_folder(ckpt2, fmt).is_dir()
    assert not old.exists()  # the stale cache of the same folder and format is gone


Usage = namedtuple("Usage", "total used free")


def test_no_disk_space_keeps_the_experts_in_ram_without_a_cache(ckpt, monkeypatch):
    fmt = _fmt(ckpt, "int8")
    monkeypatch.setattr(qcache.shutil, "disk_usage", lambda p: Usage(10, 10, 0))
    notices: list[str] = []
    store = _store(ckpt, fmt, notices)
    assert len(notices) == 1 and "not cached (not enough disk space" in notices[0]
    assert not cache_folder(ckpt, fmt).exists()
    assert store.layers[1].dtype == torch.uint8
    notices.clear()
    pools = load_compressed_pools(ckpt, fmt, device=CPU, notices=notices)
    assert len(notices) == 1 and "quantized straight to the device" in notices[0]
    assert torch.equal(pools[1], store.layers[1])
    with pytest.raises(TideError, match="not enough disk space to cache the int8 experts") as e:
        ensure_cache(ckpt, fmt, device=CPU, progress=None, notices=[])
    assert "TIDE_CACHE_DIR" in e.value.hint


def test_a_disk_that_fills_up_while_writing_leaves_no_half_cache(ckpt, monkeypatch):
    fmt = _fmt(ckpt, "fp8")
    real_write = qcache.os.fsync

    def full(fd):
        real_write(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qcache.os, "fsync", full)
    notices: list[str] = []
    _store(ckpt, fmt, notices)
    assert len(notices) == 1 and "No space left on device" in notices[0]
    folder = cache_folder(ckpt, fmt)
    assert not folder.exists() and not list(folder.parent.glob(".*partial*"))


def test_the_disk_tier_reads_the_cache_and_refuses_a_damaged_row(ckpt):
    fmt = _fmt(ckpt)
    notices: list[str] = []
    cache = ensure_cache(ckpt, fmt, device=CPU, progress=None, notices=notices)
    ram = _store(ckpt, fmt, [])
    host = host_tiers(ckpt.config, 20 * fmt.row_bytes, expert_bytes=fmt.row_bytes)
    store = CompressedTieredStore(ckpt, fmt, cache, host, pin=False)
    try:
        disk = [e for e in range(32) if not store.in_ram(3, e)]
        for batch in store.batches(3, disk[:4]):
            for e in batch.experts:
                assert torch.equal(batch.row(e), ram.layers[3][e])
        _corrupt(cache.folder, cache.offset(3, disk[-1]) + 7)
        with pytest.raises(TideError, match=f"layer 3, expert {disk[-1]}: checksum") as e:
            for batch in store.batches(3, [disk[-1]]):
                for x in batch.experts:
                    batch.row(x)
        assert "rebuilds the cache" in e.value.hint
    finally:
        store.close()
    assert not (cache.folder / MANIFEST).exists()  # the next start rebuilds it
    again = ensure_cache(ckpt, fmt, device=CPU, progress=None, notices=notices)
    assert len(notices) == 1 and "manifest is missing" in notices[0]
    again.close()


def test_engine_tiered_compressed_store_and_its_disk_error(ckpt, monkeypatch):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    fmt = _fmt(ckpt)
    ram = 20 * fmt.row_bytes / GIB
    opts = engine_options(model=str(ckpt.folder), device="cpu", policy="tide",
                          experts_per_layer=5, ram_gib=ram, experts_dtype="int4")
    eng = Engine(opts, quiet=True)
    try:
        assert isinstance(eng.runtime.store, CompressedTieredStore)
        assert any("in int4" in n and "read from disk" in n for n in eng.notices)
        assert eng.describe().runtime.experts_format == "int4"
    finally:
        eng.close()
    shutil.rmtree(cache_folder(ckpt, fmt))
    monkeypatch.setattr(qcache.shutil, "disk_usage", lambda p: Usage(10, 10, 0))
    with pytest.raises(TideError, match="not enough disk space to cache the int4 experts"):
        Engine(opts, quiet=True)


def test_generate_reuses_the_cache_and_says_a_rebuild_in_one_note(ckpt, capsys):
    from helpers import gen, tide

    args = gen(ckpt.folder, "--experts-dtype", "int4", "--policy", "tide",
               "--experts-per-layer", "6", "--json")
    outs = []
    for damage in (False, False, True):
        if damage:
            _corrupt(cache_folder(ckpt, _fmt(ckpt)), 12345)
        code, out, err = tide(args, capsys)
        assert code == 0, err
        notes = [line for line in err.splitlines() if line.startswith("note:")]
        assert len(notes) == int(damage), err  # the second start reads the cache: no note
        if damage:
            assert "was damaged" in notes[0] and "rebuilt it" in notes[0]
        obj = json.loads(out)
        assert obj["experts_format"] == "int4"
        outs.append(obj["token_ids"])
    assert outs[0] == outs[1] == outs[2]

"""The tiered host store on the CPU device: with most experts left on disk every policy gives
the all-resident tokens, the staging ring stays bounded, nothing grows across generations, and
weights read from disk are checked like those loaded into RAM."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import psutil
import pytest
import torch

from tidecli.errors import TideError
from tidecli.experts.offload import OffloadRuntime
from tidecli.experts.policies import ResidentPolicy
from tidecli.experts.store import HostExpertStore
from tidecli.experts.tiered import TieredExpertStore, choose_ram_experts, expert_runs
from tidecli.memory import host_tiers, spread
from tidecli.model.checkpoint import Checkpoint
from tidecli.units import GIB

from helpers import POLICIES, cuda_model, decode_cpu, decode_cuda, load_model

RAM_EXPERTS = 20  # of 3 layers × 32: the budget leaves 5 in RAM per layer, 81 on disk


def _budget(cfg, n=RAM_EXPERTS):
    return n * cfg.expert_bytes()


def _tiered(factory, b, *, n=RAM_EXPERTS, staging=None, keep=None):
    def make(ckpt):
        host = host_tiers(ckpt.config, _budget(ckpt.config, n), staging_experts=staging)
        store = TieredExpertStore(ckpt, host, pin=False)
        if keep is not None:
            keep.append(store)
        budgets = {layer: b for layer in ckpt.config.moe_layers}
        return OffloadRuntime(ckpt.config, store, budgets, factory(),
                              device=torch.device("cpu"), dtype=torch.float32)
    return make


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model, _ = load_model(tiny_ckpt)
    return decode_cpu(model).token_ids


# ---- accounting ---------------------------------------------------------------------------------


def test_host_tiers_fit_the_budget(tiny_ckpt):
    cfg = Checkpoint.open(tiny_ckpt).config
    eb, everything = cfg.expert_bytes(), cfg.num_moe_layers * cfg.num_experts
    full = host_tiers(cfg, everything * eb)
    assert not full.tiered and full.staging_experts == 0 and full.ram_experts == everything
    host = host_tiers(cfg, _budget(cfg))
    assert host.tiered and host.staging_experts == 5  # a quarter of the budget, at most 16
    assert host.ram_per_layer == {1: 5, 2: 5, 3: 5} and host.disk_experts == everything - 15
    assert host.ram_bytes + host.staging_bytes <= host.budget
    assert host_tiers(cfg, 90 * eb).staging_experts == 16
    assert host_tiers(cfg, _budget(cfg), staging_experts=2).ram_per_layer == {1: 6, 2: 6, 3: 6}
    with pytest.raises(TideError, match="not even enough"):
        host_tiers(cfg, eb)
    with pytest.raises(TideError, match="do not fit"):
        host_tiers(cfg, _budget(cfg), ram_per_layer={1: 20, 2: 0, 3: 0})
    assert spread(7, [1, 2, 3], 32) == {1: 3, 2: 2, 3: 2}


def test_choose_ram_experts_by_popularity():
    pop = {1: np.array([0, 9, 3, 9, 1, 0])}
    assert choose_ram_experts({1: 2}, 6, popularity=pop) == {1: [1, 3]}
    # a static placement keeps the 2 most popular on the GPU: RAM takes the next ones
    assert choose_ram_experts({1: 2}, 6, popularity=pop, skip={1: 2}) == {1: [2, 4]}
    assert choose_ram_experts({1: 3}, 6) == {1: [0, 1, 2]}
    # too few left beyond the skipped: the window stops at the end (expert 1 stays out)
    assert choose_ram_experts({1: 5}, 6, popularity=pop, skip={1: 4}) == {1: [0, 2, 3, 4, 5]}


def test_disk_rows_equal_the_loaded_rows_in_any_file_layout(tiny_ckpt, tmp_path):
    """safetensors.torch.save_file sorts tensors by name (down, gate, up of an expert), as
    published checkpoints are laid out: the reads still fill [gate | up | down]."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "resaved"
    shutil.copytree(tiny_ckpt, folder)
    for shard in folder.glob("*.safetensors"):
        save_file(load_file(shard), shard)
    ckpt = Checkpoint.open(folder)
    ram = HostExpertStore(ckpt, pin=False)
    cfg = ckpt.config
    host = host_tiers(cfg, _budget(cfg, 2), staging_experts=2)  # nothing in RAM
    disk = TieredExpertStore(ckpt, host, pin=False)
    try:
        assert host.ram_experts == 0
        third = cfg.expert_bytes() // 3
        runs = expert_runs(ckpt, 1, 0)  # one read: down, gate, up lie back to back
        assert len(runs) == 1 and runs[0][2] == [(2 * third, third), (0, third), (third, third)]
        for layer in cfg.moe_layers:
            experts = list(range(cfg.num_experts))
            for batch in disk.batches(layer, experts):
                for e in batch.experts:
                    assert torch.equal(batch.row(e), ram.expert(layer, e)), (layer, e)
        assert disk.ring.allocated == 2
    finally:
        disk.close()


# ---- tokens -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("b", [3, 12])
def test_every_policy_gives_the_resident_tokens_from_disk(tiny_ckpt, reference, name, b):
    stores: list[TieredExpertStore] = []
    model, ckpt = load_model(tiny_ckpt, runtime=_tiered(POLICIES[name], b, keep=stores))
    assert decode_cpu(model).token_ids == reference
    store = stores[0]
    s = model.experts.run_stats.summary()
    assert s["disk_reads"] > 0 and s["bytes_disk"] == s["disk_reads"] * store.expert_bytes
    assert s["gpu_hits"] + s["fetched_calls"] + s["cpu_calls"] == s["pairs"]
    assert store.ring.allocated <= store.ring.capacity == 5
    assert store.host_bytes <= _budget(ckpt.config)
    model.experts.close()


def test_resident_policy_loads_every_slot_from_disk(tiny_ckpt, reference):
    model, _ = load_model(tiny_ckpt, runtime=_tiered(ResidentPolicy, 32))
    assert decode_cpu(model).token_ids == reference
    assert model.experts.run_stats.summary()["cpu_calls"] == 0
    model.experts.close()


def test_pools_that_hold_every_expert_read_the_disk_at_load_only(tiny_ckpt, reference):
    """Full pools are filled while loading (from RAM and disk alike); the generation's figures
    then show no disk read, as none happens during the steps."""
    stores: list[TieredExpertStore] = []
    model, _ = load_model(tiny_ckpt, runtime=_tiered(POLICIES["tide"], 32, keep=stores))
    assert stores[0].host.disk_experts > 0
    assert decode_cpu(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["disk_reads"] == 0 and s["gpu_hits"] == s["pairs"]
    model.experts.close()


@pytest.mark.parametrize("name", ["tide", "static", "lru"])
def test_a_two_buffer_ring_still_gives_the_tokens(tiny_ckpt, reference, name):
    stores: list[TieredExpertStore] = []
    model, _ = load_model(tiny_ckpt, runtime=_tiered(POLICIES[name], 4, n=4, staging=2,
                                                      keep=stores))
    assert decode_cpu(model).token_ids == reference
    assert stores[0].ring.allocated == 2 and stores[0].host.ram_experts == 2
    model.experts.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_nothing_grows_across_a_long_generation(tiny_ckpt, reference):
    """Repeated generations: the ring, the tracked host bytes, reader threads and open files
    stay put, and so does the process's resident memory (within allocator noise)."""
    stores: list[TieredExpertStore] = []
    model, _ = load_model(tiny_ckpt, runtime=_tiered(POLICIES["tide"], 5, keep=stores))
    store = stores[0]
    proc = psutil.Process()
    seen = []
    for i in range(6):
        assert decode_cpu(model, gen_length=128).token_ids[:len(reference)] == reference
        seen.append((store.ring.allocated, store.host_bytes, threading.active_count(),
                     _open_fds()))
        if i == 1:
            rss = proc.memory_info().rss
    assert len(set(seen[1:])) == 1, seen
    assert store.ring.allocated == store.ring.capacity
    growth = proc.memory_info().rss - rss
    assert growth < 32 << 20, f"RSS grew {growth >> 20} MiB over 4 generations"
    reads = model.experts.run_stats.summary()["disk_reads"]
    assert reads > 1000  # the model really streamed from disk all along
    model.experts.close()
    assert threading.active_count() < seen[-1][2]  # the readers stopped


def test_a_nan_in_an_expert_on_disk_is_refused_when_read(tiny_ckpt, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, folder)
    ckpt = Checkpoint.open(folder)
    info = ckpt.expert_infos(2, 31)[1]  # up_proj of an expert that stays on disk
    with open(info.file, "r+b") as fh:
        fh.seek(info.begin + 10)
        fh.write(b"\xc0\x7f")  # bf16 NaN
    ckpt = Checkpoint.open(folder)
    store = TieredExpertStore(ckpt, host_tiers(ckpt.config, _budget(ckpt.config)), pin=False)
    try:
        assert not store.in_ram(2, 31)
        with pytest.raises(TideError, match=r"layers\.2\.mlp\.experts\.31\.up_proj.*NaN"):
            for batch in store.batches(2, [0, 30, 31]):
                for e in batch.experts:
                    batch.row(e)
        # the ring is still usable afterwards, and the good experts read fine
        for batch in store.batches(2, [30]):
            assert torch.isfinite(batch.row(30)).all()
    finally:
        store.close()


# ---- the engine and the command -----------------------------------------------------------------


def test_engine_ram_budget_tiers_the_store(tiny_ckpt):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    cfg = Checkpoint.open(tiny_ckpt).config
    gib = _budget(cfg) / GIB
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                               experts_per_layer=5, ram_gib=gib), quiet=True)
    try:
        store = eng.runtime.store
        assert isinstance(store, TieredExpertStore) and store.host.disk_experts == 81
        assert len(eng.notices) == 1 and "read from disk" in eng.notices[0]
        tiers = eng.describe().runtime.host_store.tiers
        assert tiers["ram_experts"] == 15 and tiers["staging_experts"] == 5
    finally:
        eng.close()
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                               experts_per_layer=5, ram_gib=1.0), quiet=True)
    try:  # everything fits: the plain store, no notice
        assert isinstance(eng.runtime.store, HostExpertStore) and not eng.notices
    finally:
        eng.close()
    with pytest.raises(TideError, match="more than the"):
        Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                             ram_gib=1e6), quiet=True)
    with pytest.raises(TideError, match="not even enough"):
        Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                             ram_gib=cfg.expert_bytes() / GIB), quiet=True)


def test_generate_with_ram_gives_the_same_tokens(tiny_ckpt, capsys):
    from tidecli.cli import main

    cfg = Checkpoint.open(tiny_ckpt).config
    args = ["generate", "hello", "--model", str(tiny_ckpt), "--device", "cpu", "--json",
            "--gen-length", "32", "--policy", "tide", "--experts-per-layer", "6"]
    outs = []
    for extra in ([], ["--ram", repr(_budget(cfg) / GIB)]):
        with pytest.raises(SystemExit) as info:
            main(args + extra)
        cap = capsys.readouterr()
        assert info.value.code == 0, cap.err
        outs.append((json.loads(cap.out), cap.err))
    (plain, _), (tiered, err) = outs
    assert tiered["token_ids"] == plain["token_ids"]
    assert tiered["expert_stats"]["summary"]["disk_reads"] > 0
    assert plain["expert_stats"]["summary"]["disk_reads"] == 0
    assert "note: the routed experts need" in err


# ---- CUDA: pinned ring, async copies released by events ----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["lru", "static", "tide", "tide-stall"])
def test_cuda_tiered_store_gives_the_resident_tokens(tiny_ckpt, name):
    def make(ckpt):
        host = host_tiers(ckpt.config, _budget(ckpt.config), staging_experts=4)
        store = TieredExpertStore(ckpt, host, pin=True)
        assert store.pinned
        return OffloadRuntime(ckpt.config, store, {layer: 5 for layer in ckpt.config.moe_layers},
                              POLICIES[name](), device=torch.device("cuda"),
                              dtype=torch.bfloat16)

    from tidecli.model.program import StepPrograms

    prompt = list(range(2000, 2045))
    ref = decode_cuda(cuda_model(tiny_ckpt), prompt, gen_length=96).token_ids
    model = cuda_model(tiny_ckpt, make)
    for program in (False, True):  # eager, then the step program (CUDA graphs)
        runner = StepPrograms(model) if program else model
        assert decode_cuda(runner, prompt, gen_length=96).token_ids == ref, program
    store = model.experts.store
    assert model.experts.run_stats.summary()["disk_reads"] > 0
    assert store.ring.allocated <= 4 and all(b.is_pinned() for b in store.ring.bufs)
    model.experts.close()


def _engine_run(path, ram_gib, *, graphs, **options):
    """One generation through the engine (tide, 8 of the 32 experts per layer on the device,
    misses on the device: exact); its tokens, the device slots whose bytes differ from their
    expert's in the files, and the run's counters."""
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.experts.runtime import read_expert_packed
    from tidecli.model.tensorio import ShardReader
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(path), policy="tide", experts_per_layer=8,
                               ram_gib=ram_gib, misses="gpu", graphs=graphs, **options),
                 quiet=True)
    try:
        dec = eng.decoder(eng.prompt_ids("Explain why the sky is blue to a ten-year-old."),
                          DecodeSettings(gen_length=128))
        for _ in dec.steps():
            pass
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        bad = 0
        with ShardReader() as reader:
            for layer, pool in eng.runtime.pools.pools.items():
                row = torch.empty(pool.buf.shape[1], dtype=pool.buf.dtype)
                for s, e in enumerate(pool.expert_of_slot.tolist()):
                    if e < 0:
                        continue
                    read_expert_packed(reader, eng.ckpt, layer, e, row, check=False)
                    bad += not torch.equal(pool.buf[s].cpu(), row)
        return dec.result.token_ids, bad, eng.runtime.run_stats.summary()
    finally:
        eng.close()


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_engine_with_most_experts_on_disk_gives_the_all_in_ram_tokens(tiny_ckpt, graphs):
    """The same prompt with every expert in RAM and with most on disk, twice each: the same
    tokens every time, and every GPU slot holds its expert's bytes as stored in the files."""
    ram = _budget(Checkpoint.open(tiny_ckpt).config) / GIB
    runs = {name: _engine_run(tiny_ckpt, gib, graphs=graphs)
            for name, gib in (("ram", None), ("ram2", None), ("disk", ram), ("disk2", ram))}
    for name, (tokens, bad, stats) in runs.items():
        assert tokens == runs["ram"][0], name
        assert bad == 0, name
        assert (stats["disk_reads"] > 0) == name.startswith("disk"), (name, stats["disk_reads"])


@pytest.mark.parametrize(("in_ram", "hint"), [(10, None), (40, "int4"), (60, "int8")])
def test_the_disk_tier_note_names_the_least_lossy_format_that_would_fit(tiny_ckpt, in_ram, hint):
    """bf16 experts that do not fit the RAM budget: the note says which compressed format
    (least lossy first) would hold them all, when one would."""
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    cfg = Checkpoint.open(tiny_ckpt).config
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                               experts_per_layer=5, ram_gib=_budget(cfg, in_ram) / GIB),
                 quiet=True)
    try:
        (note,) = eng.notices
        assert "read from disk" in note
        if hint is None:
            assert "--experts-dtype" not in note
        else:
            assert f"--experts-dtype {hint} would keep every expert in RAM (lossy" in note
    finally:
        eng.close()

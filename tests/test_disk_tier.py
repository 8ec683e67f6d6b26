"""The disk tier in the planner and in `tide profile`: RAM budgets, the disk term of the cost
model by hand, plans for models larger than RAM, and the disk read measurement."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tidecli.errors import TideError
from tidecli.hardware.disk import measure_disk
from tidecli.hardware.profile import HardwareProfile
from tidecli.memory import (
    HOST_OVERHEAD_BYTES,
    RAM_MARGIN,
    device_dense_bytes,
    host_embedding_bytes,
    workspace_bytes,
)
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.planner import make_plan, predict
from tidecli.planner.costs import FALLBACK_DISK_GBPS, disk_gbps
from tidecli.planner.model import Problem
from tidecli.units import GIB

from helpers import FLASH, MINI, fifo_trace, gpu_profile, tide, toy_problem

# a 24 GB card in a 64 GB desktop (as `tide profile` would write it, no disk figure)
DESKTOP = gpu_profile("RTX 3090 24 GB", vram_gib=24, mem_gbps=936, h2d_gbps=24, cores=16,
                      ram_gib=64, cpu_1tok_ms=0.12, gpu_expert_ms=0.02)


def test_disk_term_by_hand():
    base = toy_problem()
    p = Problem(cfg=base.cfg, costs=base.costs, stats=base.stats, steps=base.steps,
                ram=np.array([1, 1]))
    from dataclasses import replace

    p = Problem(cfg=p.cfg, costs=replace(p.costs, disk_expert_ms=3.0), stats=p.stats,
                steps=p.steps, ram=p.ram)
    bd = predict(p, np.array([2, 2]), 2)
    # per layer: 4 experts · ½ missed = 2 missed experts, ¾ of them on disk (1 of 4 in RAM)
    # → 1.5 reads · 3 ms = 4.5 ms; the host side pays max(CPU 2, disk 4.5) = 4.5
    assert bd.disk_reads_per_step == pytest.approx(3.0)
    assert bd.disk_ms == pytest.approx(9.0)
    assert bd.cpu_stall_ms == pytest.approx(2.0)  # as without a disk tier
    assert bd.disk_stall_ms == pytest.approx(2 * (4.5 - 2.0))
    assert bd.step_ms == pytest.approx(predict(base, np.array([2, 2]), 2).step_ms + 5.0)
    everything = Problem(cfg=p.cfg, costs=p.costs, stats=p.stats, steps=p.steps,
                         ram=np.array([4, 4]))
    assert predict(everything, np.array([2, 2]), 2).disk_ms == 0.0


def test_flash_on_a_64_gb_desktop_gets_a_three_tier_plan():
    plan = make_plan(config=FLASH, profile=DESKTOP)
    assert plan.policy == "tide" and plan.tiered
    t = plan.tiers()
    total = FLASH.num_moe_layers * FLASH.num_experts
    assert t["ram"]["experts"] + t["disk"]["experts"] == total
    assert t["disk"]["read_gbps"] == FALLBACK_DISK_GBPS
    expected = int(64 * 0.8 * GIB) - RAM_MARGIN - host_embedding_bytes(FLASH) \
        - HOST_OVERHEAD_BYTES
    assert plan.ram_budget_bytes == expected
    assert t["ram"]["bytes"] + t["ram"]["staging_bytes"] <= plan.ram_budget_bytes
    bd = plan.breakdown
    assert bd.disk_reads_per_step > 0 and bd.disk_ms > 0
    assert plan.predicted_step_ms == pytest.approx(bd.gpu_dense_ms + bd.gpu_expert_ms
                                                   + bd.cpu_stall_ms + bd.pcie_stall_ms
                                                   + bd.disk_stall_ms + bd.scratch_ms
                                                   + bd.host_ms)
    assert 0 < plan.tokens_per_s < 10
    assert any("host RAM" in w and "disk" in w for w in plan.warnings)
    assert any("assumed 2 GB/s" in n for n in plan.notes)
    d = plan.to_dict()
    assert d["tiers"]["disk"]["experts"] == plan.disk_experts
    json.dumps(d)


def test_more_ram_and_a_faster_disk_are_never_slower():
    steps = [make_plan(config=FLASH, profile=DESKTOP, ram_gib=r).predicted_step_ms
             for r in (8, 32, 64, 128, 190)]
    assert all(b <= a * 1.001 for a, b in zip(steps, steps[1:], strict=False))
    assert not make_plan(config=FLASH, profile=DESKTOP, ram_gib=190).tiered
    from dataclasses import replace

    fast = replace(DESKTOP, disk_read_gbps=7.0, disk_read_cold=True)
    slow = replace(DESKTOP, disk_read_gbps=0.5, disk_read_cold=True)
    assert make_plan(config=FLASH, profile=fast).predicted_step_ms < \
        make_plan(config=FLASH, profile=slow).predicted_step_ms


def test_a_model_that_fits_has_no_disk_tier():
    plan = make_plan(config=MINI, profile=DESKTOP, vram_gib=12)
    assert not plan.tiered and plan.breakdown.disk_ms == 0
    assert plan.tiers()["ram"]["experts"] == MINI.num_moe_layers * MINI.num_experts
    assert not any("host RAM" in w for w in plan.warnings)


def test_too_little_ram_is_one_clear_error():
    with pytest.raises(TideError) as info:
        make_plan(config=FLASH, profile=DESKTOP, ram_gib=0.01)
    assert "not even enough" in info.value.message and info.value.hint
    with pytest.raises(TideError, match="--ram must be positive"):
        make_plan(config=FLASH, profile=DESKTOP, ram_gib=-1)


def test_a_trace_moves_ram_to_the_layers_that_miss():
    trace = fifo_trace(layers=4, experts=256, distinct=0, turnover=1, blocks=3, steps=12,
                       per_layer=[8, 8, 60, 60])
    cfg = config_from_dict(preset_config("mini", layers=5))
    trace.moe_layers = cfg.moe_layers
    ram = 4 * 30 * cfg.expert_bytes() / GIB  # about 30 of 256 experts per layer
    fixed = device_dense_bytes(cfg) + cfg.kv_bytes_per_token() * 4096 + workspace_bytes(cfg, 32)
    vram = (fixed + 4 * 20 * cfg.expert_bytes()) / GIB  # 20 slots a layer: the wide ones miss
    plan = make_plan(config=cfg, profile=DESKTOP, vram_gib=vram, trace=trace, ram_gib=ram)
    assert plan.tiered
    r = [plan.experts_in_ram[layer] for layer in cfg.moe_layers]
    b = [plan.experts_per_layer[layer] for layer in cfg.moe_layers]
    # RAM goes where the GPU slots leave misses: a layer whose slots hold its whole hot set
    # keeps the minimum in RAM, the others share the rest
    covered = [j for j, n in enumerate((8, 8, 60, 60)) if b[j] >= n]
    assert covered and all(r[j] == min(r) == 1 for j in covered)
    assert len(set(r)) > 1
    assert plan.alternatives["ram_per_layer"] < plan.alternatives["ram_uniform"]
    assert sum(r) * plan.expert_bytes + plan.staging_experts * plan.expert_bytes \
        <= plan.ram_budget_bytes


def test_plan_command_shows_the_three_tiers(tmp_path, capsys):
    folder = tmp_path / "flash"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_config("flash")))
    prof = DESKTOP.save(tmp_path / "desktop.json")
    code, out, err = tide(["plan", "--model", str(folder), "--profile", str(prof),
                            "--json"], capsys)
    assert code == 0, err
    for tier in ("tier 1: GPU", "tier 2: RAM", "tier 3: disk", "disk reads"):
        assert tier in err
    obj = json.loads(out)
    assert obj["tiers"]["disk"]["experts"] > 0 and obj["predicted_tokens_per_s"] > 0
    code, out, err = tide(["plan", "--model", str(folder), "--profile", str(prof), "--ram",
                            "40", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["tiers"]["ram"]["budget_bytes"] == 40 * GIB


# ---- the profile --------------------------------------------------------------------------------


def test_measure_disk_on_a_small_temp_file(tmp_path):
    res = measure_disk(tmp_path, 4 << 20)
    assert res.gbps > 0 and res.warm_gbps > 0 and res.nbytes == 4 << 20
    assert res.source == "temporary file"
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
    assert res.cold == hasattr(os, "posix_fadvise")
    assert ("cold" in res.note()) == res.cold


def test_measure_disk_reads_a_model_shard_without_touching_it(tiny_ckpt):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_ckpt.iterdir()}
    res = measure_disk(tiny_ckpt, 1 << 20)
    assert res.source == "model file" and res.nbytes == 1 << 20
    assert {p.name: p.stat().st_mtime_ns for p in tiny_ckpt.iterdir()} == before


def test_old_profiles_without_a_disk_figure_still_plan():
    raw = DESKTOP.to_dict()
    for key in ("disk_read_gbps", "disk_read_warm_gbps", "disk_read_cold"):
        raw.pop(key)
    old = HardwareProfile.from_dict(raw)
    assert old.disk_read_gbps is None and old.disk_read_cold is None
    gbps, note = disk_gbps(old)
    assert gbps == FALLBACK_DISK_GBPS and "assumed" in note
    from dataclasses import replace

    gbps, note = disk_gbps(replace(old, disk_read_gbps=3.1, disk_read_cold=False))
    assert gbps == 3.1 and "warm" in note
    assert disk_gbps(replace(old, disk_read_gbps=3.1, disk_read_cold=True)) == (3.1, None)


def test_profile_measures_the_disk_of_the_model_folder(tiny_ckpt, capsys, monkeypatch):
    from tidecli.hardware import measure

    got = {}

    def fake_measure(**kw):
        got.update(kw)
        return DESKTOP

    monkeypatch.setattr(measure, "measure_profile", fake_measure)
    code, _, err = tide(["profile", "--model", str(tiny_ckpt), "--no-save"], capsys)
    assert code == 0, err
    assert got["disk_folder"] == tiny_ckpt


def test_measured_profile_carries_the_disk_fields(monkeypatch, tmp_path):
    import torch

    from tidecli.hardware import measure

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tiny = measure.MeasureSettings(cpu_tokens=(1,), cpu_jobs=1, cpu_repeats=1,
                                   ram_bytes=1 << 20, disk_bytes=2 << 20)
    prof = measure.measure_profile(quick=True, expert_shape=(64, 32), settings=tiny,
                                   disk_folder=tmp_path)
    assert prof.disk_read_gbps > 0 and prof.disk_read_warm_gbps > 0
    assert prof.sources["disk_read_gbps"] == "measured"
    assert any(n.startswith("disk read:") for n in prof.notes)
    assert HardwareProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof

"""The planner counts a compressed format's bytes: on the device, in host RAM, over PCIe and
from disk; `tide plan --experts-dtype` shows it and labels it lossy."""

from __future__ import annotations

import json

import pytest

from tidecli.experts.formats import expert_format
from tidecli.hardware.store import resolve_profile
from tidecli.memory import device_memory
from tidecli.model.presets import preset_config
from tidecli.planner import make_plan
from tidecli.units import GIB

from helpers import FLASH, MINI, tide


def _fmt(cfg, name):
    return expert_format(name, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)


def test_flash_int4_on_a_4090_with_60_gib_has_no_disk_tier(tmp_path, capsys):
    folder = tmp_path / "flash"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_config("flash")))
    base = ["plan", "-m", str(folder), "--profile", "rtx4090", "--vram", "22", "--ram", "60",
            "--json"]
    code, out, err = tide(base, capsys)
    assert code == 0, err
    bf16 = json.loads(out)
    assert bf16["tiers"]["disk"]["experts"] > 0 and bf16["experts_format"] == "bf16"
    code, out, err = tide(base + ["--experts-dtype", "int4"], capsys)
    assert code == 0, err
    int4 = json.loads(out)
    assert int4["experts_format"] == "int4" and int4["tiers"]["disk"]["experts"] == 0
    assert "tier 3: disk" not in err and "int4: lossy" in err
    eb = _fmt(FLASH, "int4").row_bytes
    assert int4["memory"]["expert_bytes"] == eb
    assert int4["tiers"]["ram"]["bytes"] == FLASH.num_moe_layers * FLASH.num_experts * eb
    # fewer bytes per expert: more slots in the same VRAM, and a faster plan than bf16's
    slots = sum(int(v) for v in int4["experts_per_layer"].values())
    assert slots > 3.5 * sum(int(v) for v in bf16["experts_per_layer"].values())
    assert int4["predicted_tokens_per_s"] > 10 * bf16["predicted_tokens_per_s"]


def test_the_planner_counts_format_bytes_everywhere():
    prof = resolve_profile("rtx4090")
    plans = {f: make_plan(config=MINI, profile=prof, vram_gib=10, ram_gib=60, experts_format=f)
             for f in ("bf16", "int8", "fp8", "int4")}
    for f, plan in plans.items():
        eb = MINI.expert_bytes() if f == "bf16" else _fmt(MINI, f).row_bytes
        assert plan.expert_bytes == eb
        mem = device_memory(MINI, 10, expert_bytes=None if f == "bf16" else eb)
        assert plan.used_bytes <= mem.budget
        lat = prof.copy_latency_ms or 0.0  # a copy's fixed cost, then its bytes
        assert plan.constants["c_io_ms"] - lat == pytest.approx(
            (plans["bf16"].constants["c_io_ms"] - lat) * eb / MINI.expert_bytes(), rel=0.01)
    # int4 mini: every expert fits a 10 GiB budget, so the plan is all-resident
    assert plans["int4"].policy == "resident" and plans["bf16"].policy == "tide"
    slots = {f: sum(p.experts_per_layer.values()) for f, p in plans.items()}
    assert slots["int8"] > 1.9 * slots["bf16"] and slots["int4"] == 256 * MINI.num_moe_layers


def test_a_model_larger_than_ram_reads_fewer_bytes_from_disk():
    prof = resolve_profile("rtx4090")
    bf16 = make_plan(config=FLASH, profile=prof, vram_gib=22, ram_gib=60)
    int8 = make_plan(config=FLASH, profile=prof, vram_gib=22, ram_gib=60, experts_format="int8")
    assert int8.tiered and bf16.tiered and int8.disk_experts < bf16.disk_experts
    assert int8.constants["disk_expert_ms"] < bf16.constants["disk_expert_ms"]
    assert any("93.2 GiB in int8" in w for w in int8.warnings)
    assert int8.tiers()["disk"]["bytes"] == int8.disk_experts * _fmt(FLASH, "int8").row_bytes
    assert bf16.tiers()["disk"]["bytes"] > 60 * GIB


def test_the_gpu_expert_time_of_a_format_is_the_profiles_measurement_when_it_has_one():
    """The dequantizing kernel is not bound by reading the weights (on an H200 int4 took 1.1×
    bf16's time per expert, not 0.27×): a measured time per format wins over bf16's scaled by
    the bytes, and the plan says which it used."""
    from dataclasses import replace

    from tidecli.planner.costs import hardware_costs

    prof = resolve_profile("rtx4090")
    eb = _fmt(MINI, "int4").row_bytes
    base = dict(cfg=MINI, block_length=32, context_tokens=4096, expert_bytes=eb,
                experts_format="int4")
    scaled = hardware_costs(profile=prof, **base)
    bf16 = hardware_costs(cfg=MINI, profile=prof, block_length=32, context_tokens=4096)
    assert scaled.gpu_expert_ms == pytest.approx(bf16.gpu_expert_ms * eb / MINI.expert_bytes())
    assert any("scaled from bf16's by the bytes" in n for n in scaled.notes)
    table = {t: 1.1 * v for t, v in prof.gpu_expert_ms.items()}
    measured = hardware_costs(profile=replace(prof, gpu_expert_format_ms={"int4": table}), **base)
    assert measured.gpu_expert_ms == pytest.approx(1.1 * bf16.gpu_expert_ms)
    assert any("as measured for the int4 kernel" in n for n in measured.notes)
    # the plan follows: at a budget where every int4 expert fits, its step is the expert time
    slow = make_plan(config=MINI, profile=replace(prof, gpu_expert_format_ms={"int4": table}),
                     vram_gib=20, experts_format="int4")
    fast = make_plan(config=MINI, profile=prof, vram_gib=20, experts_format="int4")
    assert slow.breakdown.gpu_expert_ms > 3 * fast.breakdown.gpu_expert_ms


@pytest.mark.parametrize(("ram", "hint"), [(30, None), (60, "int4"), (120, "int8")])
def test_a_bf16_plan_with_a_disk_tier_names_the_format_that_would_fit(ram, hint):
    plan = make_plan(config=FLASH, profile=resolve_profile("rtx4090"), vram_gib=22,
                     ram_gib=ram)
    (warning,) = [w for w in plan.warnings if "do not fit" in w]
    if hint is None:
        assert "--experts-dtype" not in warning
    else:
        assert f"--experts-dtype {hint} would keep every expert in RAM" in warning
    int4 = make_plan(config=FLASH, profile=resolve_profile("rtx4090"), vram_gib=22, ram_gib=30,
                     experts_format="int4")
    assert not any("--experts-dtype" in w for w in int4.warnings)  # asked for one already

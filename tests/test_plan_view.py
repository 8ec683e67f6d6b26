"""`tide plan` for a person choosing hardware: rounded figures, the τ cost curve only with
--verbose, rows that apply, several budgets and profiles side by side, CPU-only profiles."""

from __future__ import annotations

import json

import pytest

from tidecli.hardware.profile import HardwareProfile
from tidecli.model.presets import preset_config
from tidecli.units import GIB

from helpers import tide


@pytest.fixture
def mini(tmp_path):
    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_config("mini")))
    return str(folder)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_figures_are_rounded_and_the_tau_curve_needs_verbose(mini, capsys):
    code, _out, err = tide(["plan", "-m", mini, "-p", "rtx4070", "--vram", "10"], capsys)
    assert code == 0, err
    assert "τ (refresh interval)" in err
    assert "ms per block for τ" not in err  # the 12-value curve is out of the main table
    predicted = next(line for line in err.splitlines() if "predicted step" in line)
    for figure in predicted.replace("·", " ").split():  # no 1175.17-style figures
        digits = figure.replace(",", "").replace(".", "")
        assert not digits.isdigit() or len(digits) <= 4, predicted
    code, _out, err = tide(["plan", "-m", mini, "-p", "rtx4070", "--vram", "10", "-v"], capsys)
    assert code == 0 and "ms per block for τ = 1, 2, …" in _flat(err)


def test_rows_that_do_not_apply_are_hidden(mini, capsys):
    code, _out, err = tide(["plan", "-m", mini, "-p", "rtx4090", "--vram", "60"], capsys)
    assert code == 0, err
    assert "resident" in err
    for row in ("τ (refresh interval)", "CPU misses", "PCIe", "tier 2: RAM", "misses"):
        assert row not in err, row


def test_the_uniform_budget_names_the_models_experts():
    from tidecli.model.config import config_from_dict
    from tidecli.planner import make_plan
    from tidecli.ui.plan_view import _budgets, num, size

    from helpers import MINI

    prof = HardwareProfile(name="gpu", gpu_name="GPU", vram_total_bytes=24 * GIB)
    plan = make_plan(config=config_from_dict(preset_config("mini")), profile=prof, vram_gib=10)
    assert _budgets(plan).endswith(f"of 256 per layer ({MINI.num_moe_layers} MoE layers)")
    assert [num(x) for x in (1175.17, 87.345, 4.214, 0.0834, 0)] == \
        ["1,175", "87.3", "4.21", "0.083", "0.00"]
    assert size(3 * 2**20) == "3.00 MiB" and size(int(12.5 * GIB)) == "12.5 GiB"


def test_several_budgets_and_profiles_side_by_side(mini, capsys, tmp_path):
    out_file = tmp_path / "plans.json"
    code, out, err = tide(["plan", "-m", mini, "-p", "rtx4070,rtx4090", "--vram", "8,12,16",
                           "--json", "-o", str(out_file)], capsys)
    assert code == 0, err
    plans = json.loads(out)
    assert isinstance(plans, list) and len(plans) == 6
    assert [p["label"] for p in plans] == [f"{p} · {v} GiB" for p in ("rtx4070", "rtx4090")
                                           for v in (8, 12, 16)]
    assert [p["memory"]["budget_bytes"] for p in plans[:3]] == [8 * GIB, 12 * GIB, 16 * GIB]
    assert json.loads(out_file.read_text()) == plans
    header = " ".join(err.split("\n")[1:4])
    assert "rtx4070" in header and "16 GiB" in header and "tokens/s" in err
    assert err.count("tide plan") == 1  # one table


def test_one_plan_keeps_its_json_object(mini, capsys, tmp_path):
    code, out, err = tide(["plan", "-m", mini, "-p", "rtx4090", "--vram", "12", "--json"],
                          capsys)
    assert code == 0, err
    assert isinstance(json.loads(out), dict) and "label" not in json.loads(out)


def test_a_cpu_only_profile_says_it_has_no_gpu(mini, capsys, tmp_path):
    """It used to predict a GPU that does not exist, from assumed bandwidths."""
    path = HardwareProfile(name="laptop", gpu_name=None, cpu_physical_cores=4,
                           ram_total_bytes=16 * GIB).save(tmp_path / "laptop.json")
    code, out, err = tide(["plan", "-m", mini, "-p", str(path), "--vram", "8"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0] == ("error: the profile 'laptop' has no GPU: a plan predicts a GPU's speed, "
                        "and this profile has no figures for one")
    assert lines[1].startswith("hint: plan for a GPU with --profile NAME")


def test_calibrate_checks_one_plan(mini, capsys):
    code, _out, err = tide(["plan", "-m", mini, "-p", "rtx4090", "--vram", "8,12",
                            "--calibrate"], capsys)
    assert code == 1 and "--calibrate checks one plan" in err


def test_profile_list_shows_the_ram_each_reference_assumes(capsys):
    code, out, err = tide(["profile", "--list"], capsys)
    assert code == 0, err
    assert "RAM" in out.splitlines()[0]
    assert "128 GiB" in next(line for line in out.splitlines() if line.startswith(" rtx4090"))
    code, out, _err = tide(["profile", "--list", "--json"], capsys)
    rows = json.loads(out)
    assert all(r["ram_total_bytes"] > 0 for r in rows)

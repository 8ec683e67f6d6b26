"""The planner on LLaDA2.2's bound: routing statistics drawn with each routing block's pool
capped at expert_capacity, τ and the notes when a layer holds a whole pool, the 2.2 threshold
preset, and `tide plan` for a 2.2-flash config on the consumer profiles."""

import json

import numpy as np
import pytest

from tidecli.hardware.store import resolve_profile
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.planner import Workload, make_plan
from tidecli.planner.published import PublishedRouting
from tidecli.planner.stats import published_stats

from helpers import tide, user_error

FLASH22 = config_from_dict(preset_config("flash22"))
FLASH = config_from_dict(preset_config("flash"))
CONSUMER = ("rtx3060", "rtx4060ti", "rtx4070", "rtx4080", "rtx4090", "rtx5090")


@pytest.mark.parametrize("block,windows", [(32, 1), (64, 2)])
def test_generated_routing_respects_the_capacity_of_each_routing_block(block, windows):
    gen = PublishedRouting(num_experts=256, experts_per_token=8, num_layers=2,
                           block_length=block, capacity=48, window=32)
    for b in range(3):
        for s in range(6):
            assign = gen.step(b, s)  # [M, T, k]
            for w in range(windows):
                part = assign[:, w * 32: (w + 1) * 32]
                assert all(len(np.unique(part[m])) <= 48 for m in range(2))
            assert ((gen.counts(b, s) > 0).sum(-1) <= 48 * windows).all()


def test_published_statistics_use_the_bound():
    s22 = published_stats(FLASH22, block_length=32, max_age=6)
    s20 = published_stats(FLASH, block_length=32, max_age=6)
    assert s22.distinct.max() <= 48 < s20.distinct.min()
    # 48 slots hold a block's whole pool: a placement one step old misses little
    assert s22.miss_experts[0, 1, 48] < 0.05 < s20.miss_experts[0, 1, 48]


def test_a_budget_holding_the_pool_plans_tau_1_and_says_why():
    plan = make_plan(config=FLASH22, profile=resolve_profile("h200"), vram_gib=60)
    assert min(plan.experts_per_layer.values()) >= 48 and plan.tau == 1
    notes = " ".join(plan.notes)
    assert "at most 48 of 256 experts per layer" in notes and "whole pool" in notes
    assert "threshold 0.5" in notes  # the 2.2 decoding preset, unless --threshold is given
    small = make_plan(config=FLASH22, profile=resolve_profile("rtx4090"))
    assert min(small.experts_per_layer.values()) < 48
    assert "with 48 slots per layer tide would hold" in " ".join(small.notes)


@pytest.mark.parametrize("name", CONSUMER)
def test_flash22_plans_on_every_consumer_profile(name):
    p22 = make_plan(config=FLASH22, profile=resolve_profile(name))
    p20 = make_plan(config=FLASH, profile=resolve_profile(name))
    assert p22.policy == "tide" and p22.predicted_step_ms > 0
    # the same budget; fewer distinct experts per step, so no slower than 2.0-flash's plan
    assert p22.experts_per_layer == p20.experts_per_layer
    assert p22.predicted_step_ms <= p20.predicted_step_ms


def test_plan_refuses_a_block_length_across_routing_blocks():
    from tidecli.errors import TideError

    with pytest.raises(TideError, match="not a multiple of the model's routing block"):
        make_plan(config=FLASH22, profile=resolve_profile("rtx4090"),
                  workload=Workload(block_length=48))


def test_plan_command_on_a_config_only_22_folder(tmp_path, capsys):
    code, _, err = tide(["synth", str(tmp_path / "f22"), "--preset", "flash22",
                         "--config-only"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "f22").glob("*.safetensors"))
    code, out, err = tide(["plan", "-m", str(tmp_path / "f22"), "--profile", "rtx4090",
                           "--json"], capsys)
    assert code == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    assert data["policy"] == "tide"
    user_error(["plan", "-m", str(tmp_path / "f22"), "--profile", "rtx4090", "--block-length",
                "16"], capsys, "--block-length 16 is not a multiple")

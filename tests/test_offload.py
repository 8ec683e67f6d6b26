"""Offload policies on the CPU device: every policy and budget gives the all-resident tokens, the
step program gives the eager tokens, and the counters add up."""

import pytest
import torch

from tidecli.experts.policies import (
    LruPolicy,
    ResidentPolicy,
)

from helpers import POLICIES, decode_cpu, load_model, offload_runtime


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model, _ = load_model(tiny_ckpt)
    return decode_cpu(model).token_ids


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("b", [1, 5, 16])
def test_every_policy_gives_the_resident_tokens(tiny_ckpt, reference, name, b):
    model, _ = load_model(tiny_ckpt, runtime=offload_runtime(POLICIES[name], b))
    out = decode_cpu(model)
    assert out.token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["pairs"] > 0
    assert s["gpu_hits"] + s["fetched_calls"] + s["cpu_calls"] == s["pairs"]
    if name == "lru":
        assert s["cpu_calls"] == 0  # LRU fetches its misses through the slots
    model.experts.close()


@pytest.mark.parametrize("name", ["static", "tide", "tide-stall"])
def test_no_slot_at_all_runs_every_expert_as_a_miss(tiny_ckpt, reference, name):
    """0 experts per layer: nothing to fetch through (the prefill's fetch rounds used to spin
    for ever); every pair is a miss on its own path, and the tokens stay the resident ones."""
    model, _ = load_model(tiny_ckpt, runtime=offload_runtime(POLICIES[name], 0))
    assert decode_cpu(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["gpu_hits"] == 0 and s["cpu_calls"] == s["pairs"] > 0
    model.experts.close()


def test_resident_policy_through_the_offload_runtime(tiny_ckpt, reference):
    model, ckpt = load_model(tiny_ckpt, runtime=offload_runtime(ResidentPolicy, 32))
    assert decode_cpu(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["cpu_calls"] == 0 and s["gpu_hits"] == s["pairs"]


def test_resident_policy_refuses_a_partial_budget(tiny_ckpt):
    from tidecli.errors import TideError

    with pytest.raises(TideError, match="every expert"):
        load_model(tiny_ckpt, runtime=offload_runtime(ResidentPolicy, 8))


@pytest.mark.parametrize("name", ["resident", "lru", "tide"])
def test_step_program_gives_the_eager_tokens(tiny_ckpt, reference, name):
    factory = {"resident": None, "lru": offload_runtime(LruPolicy, 6),
               "tide": offload_runtime(POLICIES["tide"], 6)}[name]
    model, _ = load_model(tiny_ckpt, runtime=factory)
    assert decode_cpu(model, program=True).token_ids == reference
    # and again on the same (reused) program and cache
    assert decode_cpu(model, program=True).token_ids == reference


def test_step_program_with_editing(tiny_ckpt_b):
    model, _ = load_model(tiny_ckpt_b, runtime=offload_runtime(POLICIES["tide"], 5))
    eager = decode_cpu(model, editing_threshold=0.5, gen_length=64).token_ids
    assert decode_cpu(model, program=True, editing_threshold=0.5, gen_length=64).token_ids == eager


def test_tide_hits_more_than_it_misses_on_a_small_budget(tiny_ckpt):
    """Within a block the routing barely changes: the refreshed set serves most pairs."""
    model, _ = load_model(tiny_ckpt, runtime=offload_runtime(POLICIES["tide"], 12))
    decode_cpu(model)
    s = model.experts.run_stats.summary()
    assert s["gpu_hits"] > s["cpu_calls"]
    assert s["promotions"] > 0


def _offload_misses(factory, b, misses):
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.store import HostExpertStore

    def make(ckpt):
        store = HostExpertStore(ckpt, pin=False)
        budgets = {layer: b for layer in ckpt.config.moe_layers}
        return OffloadRuntime(ckpt.config, store, budgets, factory(),
                              device=torch.device("cpu"), dtype=torch.float32, misses=misses,
                              scratch_slots=3)
    return make


@pytest.mark.parametrize("name", ["static", "tide"])
def test_misses_through_the_scratch_slots_give_the_resident_tokens(tiny_ckpt, reference, name):
    """misses=gpu: every miss is copied into a scratch slot (3 here: several rounds per layer)
    and computed by the device kernel."""
    model, _ = load_model(tiny_ckpt, runtime=_offload_misses(POLICIES[name], 5, "gpu"))
    assert decode_cpu(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["cpu_calls"] == 0 and s["fetched_calls"] > 0
    assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
    # the planned placement is untouched by the scratch traffic
    assert all(pool.slots == 5 for pool in model.experts.pools.pools.values())


def test_miss_split_balances_copies_against_the_cpu():
    from tidecli.experts.misses import MissSplitter

    def splitter(mode, fetch_ms, cpu_ms):
        return MissSplitter(mode=mode, slots=4, row=6, hidden=2, inter=1,
                            device=torch.device("cpu"), dtype=torch.float32, kernel="loop",
                            fetch_ms=fetch_ms, cpu_ms=cpu_ms)

    experts, tokens = [1, 2, 3, 4, 5, 6], [1, 5, 1, 2, 1, 3]
    gpu, cpu = splitter("split", 0.1, 0.2).split(experts, tokens)
    assert sorted(gpu + cpu) == experts
    assert len(gpu) == 4 and gpu[:2] == [2, 6]  # the busiest experts go to the GPU
    assert splitter("split", 1.0, 0.1).split(experts, tokens)[0] == []  # copies too slow
    assert splitter("cpu", 0.1, 0.2).split(experts, tokens) == ([], experts)
    assert len(splitter("gpu", 1.0, 0.1).split(experts, tokens)[0]) == 6

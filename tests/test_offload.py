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


def test_a_tide_refresh_evicts_the_least_recently_used_of_the_residents_it_does_not_keep():
    """Among residents unused at the refresh step (all count 0), the one used longest ago goes
    first, not the lowest id: the placement the planner's statistics assume."""
    import numpy as np

    from tidecli.experts.modes import TideOptions
    from tidecli.experts.policies import TidePolicy
    from tidecli.experts.pools import SlotPool
    from tidecli.model.moe import ForwardInfo

    pool = SlotPool(0, 3, 8, 6, device=torch.device("cpu"), dtype=torch.float32, hidden=2,
                    inter=1)
    for slot, expert in enumerate((1, 2, 3)):
        pool.assign(slot, expert)
    pol = TidePolicy(TideOptions(tau=1))
    pol.attach({0: pool}, 8)

    def counts(*used):
        c = np.zeros(8, dtype=np.int64)
        c[list(used)] = 1
        return c

    def at(step):
        return ForwardInfo(kind="step", block=0, step=step)

    pol.after_compute(0, counts(1), at(0))
    pol.after_compute(0, counts(3), at(1))
    # 5 needs a slot; 1 and 2 are unused now: 2 was never used, so it goes (not 1, the lower id)
    moves = pol.after_compute(0, counts(3, 5), at(2))
    assert moves == [(1, 5)]
    pool.assign(1, 5)  # the runtime copies it
    assert pol.after_compute(0, counts(3, 5, 6), at(3)) == [(0, 6)]  # then 1's slot


def test_a_tide_prefill_places_the_prompts_experts_for_the_first_step():
    """Host-driven misses: after the prefill the prompt's most used experts are copied into the
    slots (streamed misses place them too); before, the first step started from whatever the
    prefill's fetch rounds left."""
    import numpy as np

    from tidecli.experts.modes import TideOptions
    from tidecli.experts.policies import TidePolicy
    from tidecli.experts.pools import SlotPool
    from tidecli.model.moe import ForwardInfo

    pool = SlotPool(0, 2, 8, 6, device=torch.device("cpu"), dtype=torch.float32, hidden=2,
                    inter=1)
    pool.assign(0, 7)
    pol = TidePolicy(TideOptions(tau=1))
    pol.attach({0: pool}, 8)
    counts = np.array([0, 0, 5, 0, 9, 1, 0, 0])
    moves = pol.after_compute(0, counts, ForwardInfo(kind="prefill"))
    assert sorted(e for _, e in moves) == [2, 4]
    assert pol.after_compute(0, counts, ForwardInfo(kind="commit", block=0)) == []


def test_an_expert_kept_from_the_scratch_slots_takes_the_least_recently_used_slot():
    """gpu misses keep what they fetched in the slot of a resident the forward did not use: an
    empty one first, then the least recently used (before: the highest slot index)."""
    from types import SimpleNamespace

    import numpy as np

    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.pools import SlotPool

    pool = SlotPool(0, 3, 8, 6, device=torch.device("cpu"), dtype=torch.float32, hidden=2,
                    inter=1)
    for slot, expert in enumerate((1, 2, 3)):
        pool.assign(slot, expert)
    recency = np.zeros(8, dtype=np.int64)
    recency[[1, 2, 3]] = [5, 9, 7]  # 1 is the least recently used
    fake = SimpleNamespace(pools=SimpleNamespace(pools={0: pool}),
                           policy=SimpleNamespace(last_used={0: recency}))
    keep = OffloadRuntime._keeper(fake, 0, np.array([6, 6]))
    keep(6, torch.ones(6))
    assert pool.slot_of_expert[6] == 0 and pool.slot_of_expert[1] < 0
    keep(5, torch.ones(6))
    assert pool.slot_of_expert[5] == 2  # then 3 (used at 7), not 2 (used at 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_steps_embedding_rows_gathered_on_the_host_are_the_tables(tiny_ckpt, dtype):
    """The step program's host gather (numpy, for a table in host memory under a GPU step)
    stages exactly the rows torch's index gives."""
    from tidecli.model.llada2 import KVCache
    from tidecli.model.program import StepProgram

    model, _ = load_model(tiny_ckpt, dtype=dtype)
    cache = KVCache(model.cfg, 64, device=torch.device("cpu"), dtype=dtype)
    prog = StepProgram(model, cache, 32, capture=False)
    table = model.w.embed
    ids = [5, 0, 17, 5, table.shape[0] - 1] + list(range(27))
    for _ in range(2):  # the numpy views are made once, then reused
        prog._host_rows(table, ids)
        assert torch.equal(prog._x_stage, table[torch.tensor(ids)])
        ids = ids[::-1]

"""Every residency policy gives the all-resident tokens on the tiny LLaDA2.2 model (block
routing, Levenshtein decoding with real edits), host-driven with CPU misses and streamed; tide
follows the routing pool when a layer's slots hold one."""

import pytest
import torch

from tidecli.decode.diffusion import DecodeSettings
from tidecli.decode.levenshtein import LevenshteinDecoder
from tidecli.experts.policies import LruPolicy, StaticPolicy, TideOptions, TidePolicy

import helpers
from helpers import PROMPT, check_tables, load_model, offload_runtime, stream_runtime

POOL = 8  # tiny22: 8 of 32 experts per 32-token routing block


def decode22(model, **kw):
    kw.setdefault("gen_length", 64)
    return helpers.decode22(model, PROMPT, **kw)


def tide(tau, *, pool=POOL, **kw):
    return lambda: TidePolicy(TideOptions(tau=tau, **kw), pool_experts=pool)


POLICIES = {
    "lru": LruPolicy,
    "static": StaticPolicy,
    "tide": tide(3),
    "tide-interval": tide(3, pool=0),  # the plain τ schedule on the same model
    "tide-stall": tide(2, stall_refresh=True),
    "tide-cold": tide(4, warm_start=False),
}


@pytest.fixture(scope="module")
def reference(tiny22_ckpt):
    model, _ = load_model(tiny22_ckpt)
    res = decode22(model)
    assert len(res.token_ids) == 64
    return res.token_ids


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("b", [4, POOL])  # below and at the pool bound
def test_every_policy_gives_the_resident_tokens_with_cpu_misses(tiny22_ckpt, reference, name, b):
    model, _ = load_model(tiny22_ckpt, runtime=offload_runtime(POLICIES[name], b))
    assert decode22(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["gpu_hits"] + s["fetched_calls"] + s["cpu_calls"] == s["pairs"] > 0
    model.experts.close()


@pytest.mark.parametrize("name,b", [("tide", 4), ("tide", POOL), ("tide", 12),
                                    ("tide-interval", POOL), ("static", POOL)])
def test_streamed_misses_give_the_resident_tokens(tiny22_ckpt, reference, name, b):
    model, _ = load_model(tiny22_ckpt, runtime=stream_runtime(POLICIES[name], b))
    assert decode22(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"] and s["cpu_calls"] == 0
    check_tables(model.experts)


@pytest.mark.parametrize("b", [4, POOL])
def test_read_ahead_on_block_routing_gives_the_resident_tokens(tiny22_ckpt, reference, b):
    """The guess is the next layer's block routing (its windows' pools, then top-k inside):
    whatever it places, the tokens are the resident run's and the tables stay sound."""
    model, _ = load_model(tiny22_ckpt, runtime=stream_runtime(POLICIES["tide"], b,
                                                              prefetch=True))
    assert decode22(model).token_ids == reference
    s = model.experts.run_stats.summary()
    assert s["prefetched"] > 0 and 0 <= s["prefetch_used"] <= s["prefetched"]
    assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
    check_tables(model.experts)


def test_a_layer_holding_the_pool_loads_it_first_and_follows_its_shifts(tiny22_ckpt, reference):
    """With slots for a whole pool, each block's first step computes every expert from the
    slots (loaded before it computes), and a later step refreshes only when its routing left
    the placement; the plain interval schedule serves its first steps from the last block's."""
    first_step_cpu = {}
    for name in ("tide", "tide-interval"):
        model, _ = load_model(tiny22_ckpt, runtime=offload_runtime(POLICIES[name], POOL))
        d = LevenshteinDecoder(model, PROMPT, DecodeSettings(gen_length=64,
                                                             decoding="levenshtein"),
                               mask_id=156895, eos_ids={156892}, edit_ids=(156930, 156931),
                               device=torch.device("cpu"))
        events = list(d.steps())
        assert d.result.token_ids == reference
        first_step_cpu[name] = sum(ev.experts.cpu_calls for ev in events if ev.step == 0)
        assert bool(model.experts.policy.describe().get("follow_pool")) == (name == "tide")
        model.experts.close()
    assert first_step_cpu["tide"] == 0 < first_step_cpu["tide-interval"]


def test_a_layer_below_the_pool_keeps_the_interval_schedule(tiny22_ckpt):
    model, _ = load_model(tiny22_ckpt, runtime=offload_runtime(POLICIES["tide"], 4))
    policy = model.experts.policy
    assert policy.pool_experts == POOL and not any(policy.holds_pool(layer)
                                                   for layer in model.cfg.moe_layers)
    model.experts.close()


def test_bench_on_the_22_model_compares_policies_with_identical_tokens(tiny22_ckpt):
    """The H200 run's shape on the tiny 2.2 model: budgets below and at the pool bound;
    the routing table reports at most the bound of distinct experts per layer and step."""
    from tidecli.bench.harness import Bench
    from tidecli.bench.spec import BenchSpec
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny22_ckpt), device="cpu"), build_runtime=False,
                 quiet=True)
    spec = BenchSpec(policies=["resident", "lru", "tide"], experts=[4, POOL],
                     workloads=["model", "synthetic"], prompts=["Hello there"], gen_length=32,
                     warmup_tokens=8)
    eng.host_store()
    report = Bench(eng, spec).run()
    eng.close()
    assert report["settings"]["decoding"] == "levenshtein"
    assert report["settings"]["threshold"] == 0.5
    for w in ("model", "synthetic"):
        routing = report["workloads"][w]["routing"]
        assert 0 < routing["distinct_max_per_layer_step"] <= POOL
    assert all(r["identical"] for r in report["runs"]), report["runs"]
    assert len(report["runs"]) == 2 * (1 + 2 * 2)

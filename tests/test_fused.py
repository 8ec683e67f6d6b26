"""The fused per-layer plan (experts/fused.py) against the torch reference path of the streamed
runtime, run in Triton's interpreter on the CPU: same tokens as the resident run, and the same
placement decisions, tables and counters as the reference, forward by forward."""

import os

import pytest
import torch

if torch.cuda.is_available():  # there the compiled kernel runs, in tests/test_gpu.py
    pytest.skip("the interpreter check is for machines without a GPU", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its library follows the mode
pytest.importorskip("triton")

from tidecli.experts.policies import StaticPolicy, TideOptions, TidePolicy  # noqa: E402

from helpers import check_tables, decode_cpu, load_model, stream_runtime  # noqa: E402


def _run(path, factory, b, fused, prefetch=False, through=False):
    model, _ = load_model(path, runtime=stream_runtime(factory, b, prefetch=prefetch))
    rt = model.experts
    rt.fused = fused
    rt.through = through  # placed experts' pairs with those read from RAM (the CUDA default)
    out = decode_cpu(model, program=True, gen_length=48)
    return out.token_ids, rt


# the interpreter runs a kernel in numpy, slowly: a few cases that cover every branch (no slots,
# LRU eviction each step, frozen placement between refreshes, the host's one-time placement)
@pytest.mark.parametrize("policy,b,through", [("tide1", 5, False), ("tide3", 20, False),
                                              ("static", 0, False), ("tide1", 5, True),
                                              ("tide3", 20, True)])
def test_fused_plan_matches_the_reference(tiny_ckpt, b, policy, through):
    factory = {"tide1": lambda: TidePolicy(TideOptions(tau=1)),
               "tide3": lambda: TidePolicy(TideOptions(tau=3)), "static": StaticPolicy}[policy]
    ref_tokens, ref = _run(tiny_ckpt, factory, b, fused=False)
    tokens, rt = _run(tiny_ckpt, factory, b, fused=True, through=through)
    assert rt._plans  # the fused path ran
    assert tokens == ref_tokens
    assert rt.run_stats.summary() == ref.run_stats.summary()
    assert torch.equal(rt.table, ref.table) and torch.equal(rt.owner, ref.owner)
    check_tables(rt)


def test_fused_read_ahead_matches_the_reference(tiny_ckpt):
    """The read-ahead's plan (the kernel without marking last use) places what the torch path
    places: same guesses scored, same tables."""
    factory = lambda: TidePolicy(TideOptions(tau=1))  # noqa: E731
    ref_tokens, ref = _run(tiny_ckpt, factory, 5, fused=False, prefetch=True)
    tokens, rt = _run(tiny_ckpt, factory, 5, fused=True, prefetch=True)
    assert rt.layer_ahead.plans  # the fused read-ahead ran
    assert tokens == ref_tokens
    s = rt.run_stats.summary()
    assert s["prefetched"] > 0
    assert s == ref.run_stats.summary()
    assert torch.equal(rt.table, ref.table) and torch.equal(rt.owner, ref.owner)
    check_tables(rt)

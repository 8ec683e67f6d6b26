"""Streamed misses (experts/stream.py) on the CPU device: the device-side placement gives the
all-resident tokens at every budget and τ, its tables stay a consistent pair of inverse maps
whose slots hold the right bytes, and the counters add up."""

import pytest
import torch

from tidecli.experts.gather import copy_rows, word_dtype
from tidecli.experts.policies import StaticPolicy, TideOptions, TidePolicy

from helpers import check_tables, decode_cpu, load_model, stream_runtime


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model, _ = load_model(tiny_ckpt)
    return decode_cpu(model).token_ids


POLICIES = {
    "tide1": lambda: TidePolicy(TideOptions(tau=1)),
    "tide3": lambda: TidePolicy(TideOptions(tau=3)),
    "tide-cold": lambda: TidePolicy(TideOptions(tau=2, warm_start=False)),
    "static": StaticPolicy,
}


CASES = [(name, b, True) for name in sorted(POLICIES) for b in (0, 3, 12, 32)] + \
    [("tide1", 3, False), ("static", 12, False)]  # the eager path (prefill runs it too)


@pytest.mark.parametrize("name,b,program", CASES)
def test_streamed_misses_give_the_resident_tokens(tiny_ckpt, reference, name, b, program):
    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(POLICIES[name], b))
    out = decode_cpu(model, program=program)
    assert out.token_ids == reference
    rt = model.experts
    s = rt.run_stats.summary()
    assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"] and s["cpu_calls"] == 0
    if b == 0:
        assert s["gpu_hits"] == 0 and s["promotions"] == 0
    if b == 32 and name == "tide1":  # every expert fits: after the first uses, all hit
        assert s["hit_rate"] > 0.9
    if b == 32 and name != "tide-cold":  # a slot for every expert: the slots start full
        assert s["hit_rate"] == 1.0 and s["promotions"] == 0
        # and each layer computes as resident does: no plan, no placement, no reads from RAM
        assert rt._whole == set(model.cfg.moe_layers) and not rt._plans
    if name == "tide-cold":  # its blocks start with empty slots: every layer plans
        assert not rt._whole
    if name.startswith("tide") and 0 < b < 32:
        assert s["promotions"] > 0
    check_tables(rt)


def test_between_refreshes_the_placement_is_frozen(tiny_ckpt, reference):
    """τ larger than any block: only the prompt (and each block's step 0) places experts."""
    model, _ = load_model(tiny_ckpt,
                          runtime=stream_runtime(lambda: TidePolicy(TideOptions(tau=64)), 6))
    out = decode_cpu(model)
    assert out.token_ids == reference
    rt1, _ = load_model(tiny_ckpt,
                        runtime=stream_runtime(lambda: TidePolicy(TideOptions(tau=1)), 6))
    decode_cpu(rt1)
    frozen = model.experts.run_stats.summary()
    every = rt1.experts.run_stats.summary()
    assert frozen["promotions"] < every["promotions"]
    assert frozen["streamed"] > every["streamed"]


def test_static_places_once_on_the_host(tiny_ckpt, reference):
    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(StaticPolicy, 8))
    assert decode_cpu(model).token_ids == reference
    s = model.experts.run_stats.summary()
    layers = model.cfg.num_moe_layers
    assert s["promotions"] == 8 * layers  # the prompt's top 8 per layer, never changed


def test_copy_rows_skips_entries_marked_minus_one():
    src = torch.arange(24, dtype=torch.float32).view(6, 4)
    dst = torch.zeros(3, 4)
    copy_rows(src, torch.tensor([5, -1, 0]), dst, torch.tensor([2, 0, 1]))
    assert torch.equal(dst[2], src[5]) and torch.equal(dst[1], src[0])
    assert torch.equal(dst[0], torch.zeros(4))
    copy_rows(src, torch.tensor([-1, -1]), dst, torch.tensor([0, 1]))  # nothing to move
    assert word_dtype(12288) == torch.int64 and word_dtype(6) == torch.int16


def test_stream_needs_experts_in_ram(tiny_ckpt):
    """With a RAM budget that leaves experts on disk, --misses stream says why and what to do."""
    from tidecli.errors import TideError
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    with pytest.raises(TideError, match="on disk"):
        Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide",
                              experts_per_layer=4, misses="stream", ram_gib=0.001), quiet=True)


# ---- read-ahead (--prefetch layer) ------------------------------------------------------------

@pytest.mark.parametrize("name,b,program", [("tide1", 3, True), ("tide1", 12, False),
                                            ("tide3", 12, True), ("static", 8, True)])
def test_read_ahead_gives_the_resident_tokens(tiny_ckpt, reference, name, b, program):
    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(POLICIES[name], b, prefetch=True))
    assert decode_cpu(model, program=program).token_ids == reference
    rt = model.experts
    s = rt.run_stats.summary()
    assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
    if name.startswith("tide"):
        assert s["prefetched"] > 0
    assert 0 <= s["prefetch_used"] <= s["prefetched"]
    ebytes = rt.expert_bytes
    assert s["bytes_prefetch_wasted"] == (s["prefetched"] - s["prefetch_used"]) * ebytes
    assert s["bytes_h2d"] == (s["promotions"] + s["streamed"]) * ebytes
    check_tables(rt)


@pytest.mark.parametrize("accuracy", [1.0, 0.0])
@pytest.mark.parametrize("program", [True, False])
def test_a_workloads_set_guess_reads_ahead_and_keeps_the_tokens(tiny_ckpt, accuracy, program):
    """The bench's synthetic routing with its guess set (--guess-accuracy): the read-ahead takes
    the workload's guess instead of the router's; a right guess is always used, a wrong one
    mostly not, and the tokens are the workload's resident ones either way."""
    from tidecli.bench.synthetic import SyntheticRouting

    def run(runtime=None, guess=None):
        model, _ = load_model(tiny_ckpt, runtime=runtime)
        model.router = SyntheticRouting(model.cfg, device=torch.device("cpu"))
        model.router.guess_accuracy = guess
        return model, decode_cpu(model, program=program).token_ids

    _, ref = run()
    model, tokens = run(stream_runtime(POLICIES["tide1"], 3, prefetch=True), accuracy)
    assert tokens == ref
    s = model.experts.run_stats.summary()
    assert s["prefetched"] > 0
    if accuracy == 1.0:
        assert s["prefetch_used"] == s["prefetched"]
    else:
        assert s["prefetch_used"] < s["prefetched"]
    check_tables(model.experts)


def _one_layer(tiny_ckpt, b):
    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(
        lambda: TidePolicy(TideOptions(tau=1)), b, prefetch=True))
    rt = model.experts
    layer = model.cfg.moe_layers[0]
    hidden = torch.randn(4, model.cfg.hidden_size)
    return rt, layer, hidden


def _forward(rt, layer, hidden, guess, ids):
    from tidecli.model.moe import ForwardInfo

    rt.begin_forward(ForwardInfo("step"))
    if guess is not None:
        rt.prefetch(layer, guess)
    out = rt.device_begin(layer, hidden, ids)
    return out, rt.end_forward().layer(layer)


def _same_as_without_a_guess(tiny_ckpt, b, rt, layer, hidden, ids, out):
    """The rows equal those of a fresh runtime that took no guess; the tables stay sound."""
    fresh, _, _ = _one_layer(tiny_ckpt, b)
    ref, c = _forward(fresh, layer, hidden, None, ids)
    assert c.prefetched == 0
    assert torch.equal(out, ref)
    check_tables(rt)


def test_a_right_guess_turns_the_layer_into_hits(tiny_ckpt):
    rt, layer, hidden = _one_layer(tiny_ckpt, 8)
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    out, c = _forward(rt, layer, hidden, ids, ids)
    assert c.prefetched == 4 and c.prefetch_used == 4 and c.bytes_prefetch_wasted == 0
    assert c.gpu_hits == ids.numel()  # every pair found its expert resident
    _same_as_without_a_guess(tiny_ckpt, 8, rt, layer, hidden, ids, out)


def test_a_wrong_guess_costs_copies_not_results(tiny_ckpt):
    rt, layer, hidden = _one_layer(tiny_ckpt, 4)
    guess = torch.tensor([[4, 5], [6, 7], [4, 6], [5, 7]])
    ids = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    out, c = _forward(rt, layer, hidden, guess, ids)
    assert c.prefetched == 4 and c.prefetch_used == 0
    assert c.bytes_prefetch_wasted == 4 * rt.expert_bytes
    assert c.gpu_hits == 0 and c.promotions == 8  # the guesses, then the layer's own
    _same_as_without_a_guess(tiny_ckpt, 4, rt, layer, hidden, ids, out)


def test_a_guess_from_the_layers_own_input_is_its_routing(tiny_ckpt):
    """The predictor is the router itself: applied to the layer's own input it is exact."""
    from tidecli.model.router import route

    model, _ = load_model(tiny_ckpt)
    layer = model.cfg.moe_layers[-1]
    n = torch.randn(6, model.cfg.hidden_size)
    ids, _ = route(n, model.w.layers[layer].router, model.cfg)
    assert torch.equal(model.predict(layer, n), ids)


def test_the_read_ahead_gate_turns_off_on_bad_guesses_and_retries():
    from tidecli.experts.readahead import ReadAheadGate

    g = ReadAheadGate(min_accuracy=0.5, window=2, retry_every=3)
    g.forward_done(0, 0)  # nothing guessed: not judged
    g.forward_done(10, 4)
    assert g.on
    g.forward_done(10, 5)  # 9 of 20 used over the window: below one half
    assert not g.on
    for _ in range(3):
        g.forward_done(0, 0)
    assert g.on and g.off_forwards == 3  # tried again
    g.forward_done(10, 6)
    g.forward_done(10, 5)  # 11 of 20
    assert g.on


def test_a_gated_read_ahead_keeps_the_tokens_and_reads_less(tiny_ckpt, reference):
    def run(gate):
        model, _ = load_model(tiny_ckpt, runtime=stream_runtime(POLICIES["tide1"], 3,
                                                                prefetch=True))
        model.experts.ahead_gate = gate
        assert decode_cpu(model, program=True).token_ids == reference
        check_tables(model.experts)
        return model.experts.run_stats.summary(), gate

    from tidecli.experts.readahead import ReadAheadGate

    free, _ = run(ReadAheadGate(min_accuracy=0.0))
    gated, gate = run(ReadAheadGate(min_accuracy=1.01, window=2, retry_every=10_000))
    assert not gate.on and gate.off_forwards > 0
    assert gated["prefetch_off_forwards"] == gate.off_forwards  # the run's counters say so too
    assert free["prefetch_off_forwards"] == 0
    assert 0 < gated["prefetched"] < free["prefetched"]


def test_counters_are_counted_when_first_asked_for(tiny_ckpt, reference):
    """Untraced, a forward's counters are queued and counted when read (the decoder reads them
    after its step's sync); the totals are those of counting each forward at once (traced)."""
    model, _ = load_model(tiny_ckpt,
                          runtime=stream_runtime(lambda: TidePolicy(TideOptions(tau=1)), 6))
    rt = model.experts
    deferred = []
    end = rt.end_forward

    def end_forward():
        out = end()
        deferred.append(rt._pending)
        return out

    rt.end_forward = end_forward
    assert decode_cpu(model).token_ids == reference
    assert all(deferred) and not rt._pending  # every forward queued, the last one counted
    lazy = rt.run_stats.summary()
    traced, _ = load_model(tiny_ckpt,
                           runtime=stream_runtime(lambda: TidePolicy(TideOptions(tau=1)), 6))
    traced.experts.enable_trace()
    decode_cpu(traced)
    assert not traced.experts._pending
    assert traced.experts.run_stats.summary() == lazy

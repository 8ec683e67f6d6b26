"""The read-ahead between steps (experts/stepahead.py): its plan against the layer-by-layer
reference, and the bench runs that use it on the CPU (misses stream there too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidecli.bench.spec import BenchSpec
from tidecli.experts.policies import TideOptions, TidePolicy
from tidecli.experts.stepahead import plan_ahead, plan_ahead_reference

from helpers import bench_runs, check_tables, decode_cpu, load_model, stream_runtime


def _case(rng, m=4, e=24, bmax=10, t=6, k=3):
    slots = rng.integers(0, bmax + 1, size=m)
    slots[0] = bmax  # one layer at the widest
    table = np.full((m, e + 1), -1, dtype=np.int64)
    owner = np.full((m, bmax + 1), -1, dtype=np.int64)
    last = rng.integers(-1, 6, size=(m, bmax + 1)).astype(np.int64)
    for j in range(m):
        held = rng.permutation(e)[: rng.integers(0, slots[j] + 1)]
        where = rng.permutation(int(slots[j]))[: held.size]
        table[j, held] = where
        owner[j, where] = held
    guess = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(t)]) for _ in range(m)])
    return guess, table, owner, last, slots


@pytest.mark.parametrize("seed", range(40))
def test_the_plan_is_the_layer_by_layer_reference(seed):
    rng = np.random.default_rng(seed)
    guess, table, owner, last, slots = _case(rng)
    t2, o2 = table.copy(), owner.copy()
    fast = plan_ahead(guess, table, owner, last, slots)
    ref = plan_ahead_reference(guess, t2, o2, last, slots)
    assert [(list(a), list(b)) for a, b in fast] == [(list(a), list(b)) for a, b in ref]
    assert np.array_equal(table, t2) and np.array_equal(owner, o2)
    for j in range(table.shape[0]):
        held = table[j, :-1]
        # the tables agree with each other, and nothing lands past a layer's slots
        assert all(owner[j, s] == x for x, s in enumerate(held) if s >= 0)
        assert (held < slots[j]).all()
        wanted = set(guess[j].ravel().tolist())
        # a guessed expert never makes way for another
        before = set(np.flatnonzero(t2[j, :-1] >= 0).tolist())
        assert wanted & before <= set(np.flatnonzero(held >= 0).tolist())


def test_free_slots_go_first_then_the_least_recently_used():
    table = np.full((1, 9), -1, dtype=np.int64)
    owner = np.full((1, 5), -1, dtype=np.int64)
    for e, s in ((0, 0), (1, 1), (2, 3)):
        table[0, e], owner[0, s] = s, e
    last = np.array([[5, 2, 0, 7, 0]])  # slot 2 is free; of the held, slot 1 is the oldest
    guess = np.array([[[4, 5], [4, 6]]])  # 4 twice: placed first; 5 and 6 tie
    moves = plan_ahead(guess, table, owner, last, np.array([4]))
    assert [list(x) for x in moves[0]] == [[4, 5, 6], [2, 1, 0]]
    assert table[0, :8].tolist() == [-1, -1, 3, -1, 2, 1, 0, -1]
    # no slot left that the guess does not use: nothing more is placed
    assert [list(x) for x in plan_ahead(np.array([[[7, 4, 2], [5, 6, 2]]]), table, owner, last,
                                        np.array([4]))[0]] == [[], []]


def test_bench_reads_ahead_between_steps_and_keeps_the_tokens(tiny_ckpt):
    """--prefetch step on the drifting workload: a right guess is always used, a guess left to
    chance is seldom; every run gives the resident tokens; the model's routing is skipped."""
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["resident", "tide"], experts=[4], workloads=["model", "drifting"], taus=[1],
        misses=["stream"], prefetch=["off", "step"], guesses=[1.0, 0.0],
        prompts=["Hello there"], gen_length=16, warmup_tokens=4))
    got = [(r["workload"], r.get("prefetch"), r.get("guess_accuracy"), r.get("skipped"))
           for r in runs]
    assert got == [
        ("model", None, None, None), ("model", "off", None, None),
        ("model", "step", None, "the model's own routing has no step guess"),
        ("drifting", None, None, None), ("drifting", "off", None, None),
        ("drifting", "step", 1.0, None), ("drifting", "step", 0.0, None)]
    done = [r for r in runs if not r.get("skipped")]
    assert all(r["identical"] for r in done if r["policy"] != "resident"), runs
    right, wrong = runs[5], runs[6]
    assert right["prefetched"] > 0 and right["prefetch_accuracy"] == 1.0
    # with every guess right the step's own plan finds the experts in their slots
    assert right["step_hit_rate"] > runs[4]["step_hit_rate"]
    assert (wrong["prefetch_accuracy"] or 0.0) < 0.5


def test_the_step_read_ahead_needs_a_set_guess_on_a_synthetic_workload():
    from tidecli.commands.bench import bench_spec
    from tidecli.errors import TideError

    common = dict(policies="tide", vram="10", experts_per_layer=None, tau="plan",
                  misses="stream", prompts=None, gen_length=8, threshold=None, repeat=1)
    with pytest.raises(TideError, match="--prefetch step"):
        bench_spec(workloads="drifting", prefetch="step", **common)
    with pytest.raises(TideError, match="--prefetch step"):
        bench_spec(workloads="model", prefetch="step", guess_accuracy="1", **common)
    spec = bench_spec(workloads="model,drifting", prefetch="off,step", guess_accuracy="1",
                      **common)
    assert spec.prefetch == ["off", "step"]


def test_generate_keeps_the_step_read_ahead_to_the_bench():
    from tidecli.errors import TideError
    from tidecli.experts.modes import parse_prefetch

    with pytest.raises(TideError, match="use off, layer"):
        parse_prefetch("step")


def _synthetic(model, accuracy):
    from tidecli.bench.synthetic import SyntheticRouting

    model.router = SyntheticRouting(model.cfg, device=torch.device("cpu"))
    model.router.guess_accuracy = accuracy
    return model


@pytest.mark.parametrize("accuracy", [1.0, 0.5])
@pytest.mark.parametrize("tau,program", [(1, True), (1, False), (3, True), (2, False)])
def test_a_step_read_ahead_keeps_the_tokens_and_the_tables(tiny_ckpt, accuracy, tau, program):
    model, _ = load_model(tiny_ckpt)
    ref = decode_cpu(_synthetic(model, None), program=program).token_ids
    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(
        lambda: TidePolicy(TideOptions(tau=tau)), 3, prefetch_steps=True))
    assert decode_cpu(_synthetic(model, accuracy), program=program).token_ids == ref
    rt = model.experts
    s = rt.run_stats.summary()
    assert s["prefetched"] > 0 and s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
    if accuracy == 1.0:
        assert s["prefetch_used"] == s["prefetched"]
    assert s["bytes_h2d"] == (s["promotions"] + s["streamed"]) * rt.expert_bytes
    assert rt.describe().prefetch == "step"
    check_tables(rt)


def test_the_read_ahead_plans_from_the_tables_the_device_holds_now(tiny_ckpt):
    """A forward's end is not the only writer of the device tables: capturing a step runs its
    layers once outside any forward. The read-ahead reads the tables when it plans, so rows and
    tables still agree after such a run (a copy kept from the last forward's end would not)."""
    from tidecli.model.moe import ForwardInfo

    model, _ = load_model(tiny_ckpt, runtime=stream_runtime(
        lambda: TidePolicy(TideOptions(tau=1)), 3, prefetch_steps=True))
    decode_cpu(_synthetic(model, 1.0), gen_length=32)
    rt, cfg = model.experts, model.cfg
    rng = np.random.default_rng(0)
    layer = cfg.moe_layers[0]
    hidden = torch.zeros((8, cfg.hidden_size))
    for _ in range(3):  # as a capture's warm-up does: the layer places whatever it is given
        ids = torch.from_numpy(rng.choice(cfg.num_experts, size=(8, rt.k)))
        rt.device_begin(layer, hidden, ids)
    check_tables(rt)
    rt.begin_forward(ForwardInfo("step", block=9, step=0))
    guess = rng.integers(0, cfg.num_experts, size=(cfg.num_moe_layers, 8, rt.k))
    rt.prefetch_step(guess)
    assert rt.ahead.placed
    check_tables(rt)

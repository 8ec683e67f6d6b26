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
    before = table.copy()
    fast = plan_ahead(guess, table, owner, last, slots)
    ref = plan_ahead_reference(guess, t2, o2, last, slots)
    assert [(list(a), list(b)) for a, b in fast] == [(list(a), list(b)) for a, b in ref]
    assert np.array_equal(table, t2) and np.array_equal(owner, o2)
    for j in range(table.shape[0]):
        held = table[j, :-1]
        # the tables agree with each other, and nothing lands past a layer's slots
        assert all(owner[j, s] == x for x, s in enumerate(held) if s >= 0)
        assert (held < slots[j]).all()
        # an expert that made way had fewer votes than every expert placed
        votes = np.bincount(guess[j].ravel(), minlength=table.shape[1] - 1)
        placed, _ = fast[j]
        gone = np.flatnonzero((before[j, :-1] >= 0) & (held < 0))
        if placed.size and gone.size:
            assert votes[gone].max() <= votes[placed].min()


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
    """--prefetch step: on the model's routing and the drifting workload's it guesses from the
    step before; on drifting also with set guesses, a right one always used, one left to
    chance seldom; the synthetic workload, whose entering experts are drawn at random, is
    skipped with why; every run gives the resident tokens."""
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["resident", "tide"], experts=[4], workloads=["model", "drifting", "synthetic"],
        taus=[1], misses=["stream"], prefetch=["off", "step"], guesses=[1.0, 0.0],
        prompts=["Hello there"], gen_length=16, warmup_tokens=4))
    got = [(r["workload"], r.get("prefetch"), r.get("guess_accuracy"), bool(r.get("skipped")))
           for r in runs]
    assert got == [
        ("model", None, None, False), ("model", "off", None, False),
        ("model", "step", None, False),
        ("drifting", None, None, False), ("drifting", "off", None, False),
        ("drifting", "step", None, False), ("drifting", "step", 1.0, False),
        ("drifting", "step", 0.0, False),
        ("synthetic", None, None, False), ("synthetic", "off", None, False),
        ("synthetic", "step", None, True), ("synthetic", "step", 1.0, False),
        ("synthetic", "step", 0.0, False)]
    assert "at random" in runs[10]["skipped"]
    done = [r for r in runs if not r.get("skipped")]
    assert all(r["identical"] for r in done if r["policy"] != "resident"), runs
    own, right, wrong = runs[5], runs[6], runs[7]
    assert own["prefetched"] > 0 and runs[2]["prefetch"] == "step"
    assert right["prefetched"] > 0 and right["prefetch_accuracy"] == 1.0
    # with every guess right the step's own plan finds the experts in their slots
    assert right["step_hit_rate"] > runs[4]["step_hit_rate"]
    assert (wrong["prefetch_accuracy"] or 0.0) < 0.5


def test_every_command_takes_the_step_read_ahead():
    from tidecli.commands.bench import bench_spec
    from tidecli.errors import TideError
    from tidecli.experts.modes import parse_prefetch

    assert parse_prefetch("step") == "step"
    with pytest.raises(TideError, match="use off, layer, step"):
        parse_prefetch("next")
    common = dict(policies="tide", vram="10", experts_per_layer=None, tau="plan",
                  misses="stream", prompts=None, gen_length=8, threshold=None, repeat=1)
    assert bench_spec(workloads="model", prefetch="off,step", **common).prefetch == ["off", "step"]
    with pytest.raises(TideError, match="--guess-accuracy"):
        bench_spec(workloads="model", prefetch="step", guess_accuracy="1", **common)


def test_step_ranks_guess_a_step_from_the_one_before_in_its_block():
    from types import SimpleNamespace

    from tidecli.model.moe import ForwardInfo
    from tidecli.model.router import biased, router_scores
    from tidecli.model.stepranks import StepRanks

    cfg = SimpleNamespace(num_moe_layers=2, num_experts=16, num_experts_per_tok=3)
    ranks = StepRanks(cfg, torch.device("cpu"), below=2)
    gen = torch.Generator().manual_seed(0)
    w = [SimpleNamespace(weight=torch.randn(16, 8, generator=gen),
                         expert_bias=torch.randn(16, generator=gen)) for _ in range(2)]
    x = [torch.randn(4, 8, generator=gen) for _ in range(2)]

    def forward(kind, block, step, tokens=4):
        ranks.begin(ForwardInfo(kind, block=block, step=step), tokens)
        guess = ranks.guess()
        for j in range(2):
            ranks.observe(j, x[j] * (step + 1), w[j])
        return guess

    assert forward("prefill", 0, 0, tokens=9) is None
    assert forward("step", 0, 0) is None  # a block's first step
    got = forward("step", 0, 1)
    want = [biased(router_scores(x[j], w[j]), w[j]).topk(5, dim=-1).indices for j in range(2)]
    assert got.shape == (2, 4, 5) and np.array_equal(got, torch.stack(want).numpy())
    assert forward("step", 0, 2) is not None
    assert forward("commit", 0, 2) is None
    assert forward("step", 1, 0) is None and forward("step", 1, 2) is None  # not the one before


def test_the_drifting_workload_guesses_a_step_from_its_ranks_at_the_one_before(tiny_ckpt):
    from tidecli.bench.synthetic import DriftingRouting
    from tidecli.model.checkpoint import Checkpoint
    from tidecli.model.moe import ForwardInfo
    from tidecli.model.stepranks import BELOW

    cfg = Checkpoint.open(tiny_ckpt).config
    r = DriftingRouting(cfg, device=torch.device("cpu"), block_length=8)
    r.predict_steps = True
    r.prepare(blocks=1, steps=3)
    r.begin(ForwardInfo("step", block=0, step=0), 8)
    assert r.step_guess() is None
    r.begin(ForwardInfo("step", block=0, step=2), 8)
    want = r.ranked(0, 1, cfg.num_experts_per_tok + BELOW)
    assert np.array_equal(r.step_guess(), want)
    r.predict_steps = False
    assert r.step_guess() is None


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
    assert rt.ahead_gate.window == 2  # a whole step's guess at once: judged sooner
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
    rt.prefetch_step(lambda: guess)
    assert rt.ahead.placed
    check_tables(rt)

"""The guess-accuracy measurement (bench/guesses.py): the recorder leaves the routing as it is,
and the scores count what they say on hand-made records."""

import numpy as np
import pytest

from tidecli.bench.guesses import ForwardRecord, GuessRecorder, LayerRecord, score
from tidecli.model.moe import ForwardInfo

from helpers import decode_cpu, load_model


def test_the_recorder_routes_as_the_model_does(tiny_ckpt):
    model, _ = load_model(tiny_ckpt)
    want = decode_cpu(model, gen_length=48).token_ids
    rec = GuessRecorder([model.w.layers[layer].router for layer in model.cfg.moe_layers],
                        ranked=3)
    model.router = rec
    assert decode_cpu(model, gen_length=48).token_ids == want
    steps = [f for f in rec.forwards if f.info.kind == "step"]
    assert steps and all(len(f.layers) == model.cfg.num_moe_layers for f in steps)
    last = model.cfg.num_moe_layers - 1
    for f in steps:
        for j, r in f.layers.items():
            assert r.next_ranked.shape == (r.ids.shape[0], 3)
            # the next-ranked experts are never the token's own choice
            assert not (r.next_ranked[:, :, None] == r.ids[:, None, :]).any()
            assert (r.guess_next_layer is None) == (j == last)
    s = score(rec.forwards)
    for v in s.values():
        assert 0 <= v.hit <= min(v.guessed, v.new)


def _rec(ids, ranked, guess=None):
    return LayerRecord(np.array(ids), np.array(ranked),
                       np.array(guess) if guess is not None else None)


def test_scores_count_guesses_against_the_newly_used_experts():
    step = lambda n: ForwardInfo("step", block=0, step=n)  # noqa: E731
    f0 = ForwardRecord(step(0), {0: _rec([[1, 2]], [[3, 4]], guess=[[5, 6]]),
                                 1: _rec([[5, 7]], [[8, 9]])})
    f1 = ForwardRecord(step(1), {0: _rec([[1, 3]], [[2, 4]], guess=[[5, 8]]),
                                 1: _rec([[5, 8]], [[7, 9]])})
    f_other = ForwardRecord(ForwardInfo("step", block=1, step=0), {0: _rec([[9, 9]], [[1, 2]])})
    s = score([f0, f1, f_other])  # the next block's first step pairs with nothing
    # step guesses at step 0: layer 0 {3, 4}, entering at step 1 {3}; layer 1 {8, 9} (less
    # {5, 7}, used at step 0), entering {8}
    assert s["step"].to_dict() == {"guessed": 4, "hit": 2, "new": 2, "precision": 0.5,
                                   "recall": 1.0, "new_per_layer": 1.0}
    # layer guess for layer 1 at step 1: {5, 8} less {5, 7} used a step earlier → {8}: used
    assert s["layer"].to_dict() == {"guessed": 1, "hit": 1, "new": 1, "precision": 1.0,
                                    "recall": 1.0, "new_per_layer": 1.0}
    assert s["block"].cases == 0  # no commit pass before block 1: not a block start here


def test_a_block_start_is_guessed_from_the_previous_blocks_first_step():
    def fwd(kind, block, step, ids):
        return ForwardRecord(ForwardInfo(kind, block=block, step=step),
                             {0: _rec(ids, [[0, 0]] * len(ids))})

    first = fwd("step", 0, 0, [[1, 2], [3, 4]])
    last = fwd("step", 0, 5, [[1, 5]])
    commit = fwd("commit", 0, 6, [[5, 6]])
    start = fwd("step", 1, 0, [[1, 3], [7, 6]])
    # another generation: its first step follows a step, not a commit pass: not scored
    other = fwd("step", 2, 0, [[9, 8]])
    s = score([first, last, commit, start, other])["block"]
    # guess {1, 2, 3, 4} less {5, 6} (the commit pass's); new at the start {1, 3, 7}; hit {1, 3}
    assert s.to_dict() == {"guessed": 4, "hit": 2, "new": 3, "precision": 0.5,
                           "recall": round(2 / 3, 4), "new_per_layer": 3.0}


def test_no_pairs_no_figures():
    s = score([ForwardRecord(ForwardInfo("prefill"))])
    assert s["step"].precision is None and s["layer"].recall is None


@pytest.mark.parametrize("ranked", [1, 2])
def test_a_guess_from_the_layers_own_input_would_be_exact(tiny_ckpt, ranked):
    """Sanity of the scoring on real records: guessing each layer with its own routing scores
    every newly used expert as hit."""
    model, _ = load_model(tiny_ckpt)
    rec = GuessRecorder([model.w.layers[layer].router for layer in model.cfg.moe_layers],
                        ranked=ranked)
    model.router = rec
    decode_cpu(model, gen_length=32)
    for f in rec.forwards:  # replace each layer's next-layer guess by that layer's own choice
        for j, r in f.layers.items():
            nxt = f.layers.get(j + 1)
            r.guess_next_layer = nxt.ids if nxt is not None else None
    s = score(rec.forwards)["layer"]
    assert s.new > 0 and s.hit == s.new == s.guessed


def test_the_step_guess_on_the_drifting_workload():
    """On drifting scores the experts ranked just below the top-k foresee most of the next
    step's entering ones; more ranks foresee more and waste more."""
    from tidecli.bench.drift import DriftingScores
    from tidecli.bench.guesses import score_drifting

    gen = DriftingScores(num_experts=256, experts_per_token=8, num_layers=4)
    one, four = (score_drifting(gen, blocks=2, steps=8, ranked=r) for r in (1, 4))
    assert one.new == four.new > 0  # the same entering experts are scored
    assert 0.3 < one.precision and one.recall < four.recall and four.recall > 0.7
    assert four.precision < one.precision and four.guessed > one.guessed

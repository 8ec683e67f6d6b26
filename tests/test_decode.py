"""Decoding rules on a model whose logits are scripted step by step."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidecli.decode.diffusion import (
    BlockDiffusionDecoder,
    DecodeSettings,
    IdStage,
    quota_schedule,
    want_rows,
)

V, MASK, EOS = 12, 11, 10


class Scripted:
    """reference_logits returns, for each asked row, a distribution whose argmax and confidence
    come from `script(step, absolute_position, current_tokens) -> (token, confidence)`."""

    cfg = None
    dtype = torch.float32

    def __init__(self, script):
        self.script = script
        self.calls = 0

    def reference_logits(self, ids, rows, info, *, block_length=None):
        out = []
        for pos in rows.tolist():
            tok, conf = self.script(self.calls, pos, ids.tolist())
            rest = (1 - conf) / (V - 1)
            logits = torch.full((V,), math.log(rest))
            logits[tok] = math.log(conf)
            out.append(logits)
        self.calls += 1
        return torch.stack(out)


def run(script, prompt, **kw):
    kw.setdefault("use_cache", False)
    d = BlockDiffusionDecoder(Scripted(script), prompt, DecodeSettings(**kw), mask_id=MASK,
                              eos_ids={EOS}, device=torch.device("cpu"))
    events = list(d.steps())
    return d.result, events


def test_quota_schedule():
    assert quota_schedule(32, 32) == [1] * 32
    assert quota_schedule(10, 4) == [3, 3, 2, 2]


def test_the_rows_a_step_looks_at():
    """The masked offsets; with editing every generated one too (not the prompt's), ascending."""
    block = [1, MASK, 0, MASK, 3]  # block starts at 10; the prompt ends at 13
    assert want_rows(block, MASK, 10, 13, False) == [1, 3]
    assert want_rows(block, MASK, 10, 13, True) == [1, 3, 4]
    assert want_rows([0, 3], MASK, 10, 0, False) == []


def test_ids_staged_to_the_device_are_fresh_or_written_into_place():
    stage = IdStage(8, torch.device("cpu"))
    first = stage.put([3, 1, 4])
    second = stage.put([5, 9])  # the buffer is reused; the first result is not
    assert first.dtype == torch.long and first.tolist() == [3, 1, 4]
    assert second.tolist() == [5, 9] and stage.put([]).tolist() == []
    x = torch.zeros(10, dtype=torch.long)
    stage.put([7] * 8, out=x[2:])
    assert x.tolist() == [0, 0] + [7] * 8


def test_threshold_commits_all_confident_positions_at_once():
    # positions 4..7: 4 and 6 are confident at the first step
    def script(step, pos, ids):
        return (pos % 10, 0.99 if pos in (4, 6) or step > 0 else 0.5)

    res, events = run(script, [1, 2, 3, 4], gen_length=4, block_length=4)
    assert [p for p, _ in events[0].committed] == [4, 6]
    assert len(events) == 2 and res.token_ids == [4, 5, 6, 7]
    assert res.steps == 2 and res.tokens_per_step == 2.0


def test_quota_fallback_commits_the_most_confident():
    def script(step, pos, ids):
        return (3, {4: 0.3, 5: 0.6, 6: 0.2, 7: 0.5}[pos])

    _, events = run(script, [1, 2, 3, 4], gen_length=4, block_length=4)
    assert [e.committed[0][0] for e in events] == [5, 7, 4, 6]
    assert all(len(e.committed) == 1 for e in events)


def test_prompt_tail_block_keeps_the_prompt():
    def script(step, pos, ids):
        return (7, 0.99)

    res, events = run(script, [1, 2, 3, 4, 5, 6], gen_length=6, block_length=4)
    assert events[0].block == 1 and events[0].block_start == 4
    assert [p for p, _ in events[0].committed] == [6, 7]  # 4, 5 are prompt
    assert res.token_ids == [7] * 6


def test_eos_stops_after_its_block_and_trims():
    # block 1 (positions 4..7) writes EOS at 6; block 2 must never run
    def script(step, pos, ids):
        return (EOS if pos == 6 else 3, 0.99)

    res, events = run(script, [1, 2, 3, 4], gen_length=12, block_length=4)
    assert res.stopped_at_eos and res.token_ids == [3, 3]
    assert max(e.block for e in events) == 1


def test_editing_rewrites_committed_tokens_then_stops_when_nothing_changes():
    # step 0 commits every position as 3; step 1 proposes 5 at position 4 with 0.8 > 0.5
    def script(step, pos, ids):
        if step == 1 and pos == 4:
            return (5, 0.8)
        if step == 1 and pos == 5:
            return (6, 0.4)  # below the editing threshold: kept
        return (ids[pos] if ids[pos] != MASK else 3, 0.99)

    res, events = run(script, [1, 2, 3, 4], gen_length=4, block_length=4, threshold=0.9,
                      editing_threshold=0.5)
    assert events[1].edited == [(4, 5)]
    assert events[2].edited == [] and events[2].block_done
    assert res.token_ids == [5, 3, 3, 3] and res.steps == 3


def test_editing_post_steps_are_bounded():
    # the model keeps flipping position 4 forever: max_post_steps ends the block
    def script(step, pos, ids):
        if pos == 4:
            return (3 + step % 2, 0.99)
        return (3, 0.99)

    res, events = run(script, [1, 2, 3, 4], gen_length=4, block_length=4, threshold=0.9,
                      editing_threshold=0.5, max_post_steps=2)
    assert len(events) == 3  # the unmasking step and two post steps


def test_sampling_is_seeded():
    def script(step, pos, ids):
        return (pos % 10, 0.3)

    kw = dict(gen_length=8, block_length=4, temperature=1.0, seed=42)
    a, _ = run(script, [1, 2], **kw)
    b, _ = run(script, [1, 2], **kw)
    assert a.token_ids == b.token_ids


# ---- no model and no logits can keep a block open ------------------------------------------------


class Favouring(Scripted):
    """Random logits whose argmax is often the mask id itself (as damaged or random weights
    can give), drawn from a seeded generator."""

    def __init__(self, seed, mask_share):
        super().__init__(None)
        self.gen = torch.Generator().manual_seed(seed)
        self.mask_share = mask_share

    def reference_logits(self, ids, rows, info, *, block_length=None):
        self.calls += 1
        out = torch.randn(len(rows), V, generator=self.gen) * 3
        favour = torch.rand(len(rows), generator=self.gen) < self.mask_share
        out[favour, MASK] = 50.0  # the mask is the model's top choice, with certainty
        return out


def test_the_mask_id_is_never_committed_and_every_block_ends():
    d = BlockDiffusionDecoder(Favouring(0, 1.0), [1, 2, 3], DecodeSettings(
        gen_length=8, block_length=4, use_cache=False), mask_id=MASK, eos_ids={EOS},
        device=torch.device("cpu"))
    events = list(d.steps())
    assert d.result.finished and MASK not in d.x.tolist()
    assert all(t != MASK for ev in events for _p, t in ev.committed)
    assert max(ev.step for ev in events) < d.block_bound()


def test_rows_past_the_tokenizer_are_never_committed():
    class Past(Scripted):  # the best row is an id the tokenizer does not have
        def reference_logits(self, ids, rows, info, *, block_length=None):
            out = torch.zeros(len(rows), V)
            out[:, V - 1] = 40.0
            return out

    d = BlockDiffusionDecoder(Past(None), [1, 2], DecodeSettings(
        gen_length=4, block_length=4, use_cache=False), mask_id=0, eos_ids={EOS},
        device=torch.device("cpu"), output_vocab=V - 1)
    list(d.steps())
    assert max(d.result.token_ids) < V - 1


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), share=st.floats(0.0, 1.0), editing=st.booleans(),
       block=st.sampled_from([1, 2, 4, 8]), post=st.integers(0, 6),
       threshold=st.floats(0.05, 1.0))
def test_every_block_ends_within_its_bound_for_random_logits(seed, share, editing, block, post,
                                                             threshold):
    s = DecodeSettings(gen_length=2 * block + 1, block_length=block, threshold=threshold,
                       editing_threshold=0.0 if editing else None, max_post_steps=post,
                       use_cache=False)
    d = BlockDiffusionDecoder(Favouring(seed, share), [1, 2, 3], s, mask_id=MASK,
                              eos_ids={EOS}, device=torch.device("cpu"))
    per_block: dict[int, int] = {}
    for ev in d.steps():
        per_block[ev.block] = per_block.get(ev.block, 0) + 1
    assert d.result is not None and all(n <= d.block_bound() for n in per_block.values())
    assert MASK not in d.result.token_ids


def test_sampling_without_a_seed_draws_a_fresh_one_and_reports_it():
    def script(step, pos, ids):
        return (pos % 10, 0.5)

    seeds = set()
    for _ in range(3):
        res, _events = run(script, [1, 2], gen_length=4, block_length=4, temperature=1.0)
        seeds.add(res.seed)
    assert None not in seeds and len(seeds) == 3
    res, _ = run(script, [1, 2], gen_length=4, block_length=4, temperature=1.0, seed=7)
    assert res.seed == 7
    assert run(script, [1, 2], gen_length=4, block_length=4)[0].seed is None  # greedy


def test_a_checkpoint_whose_head_favours_the_mask_row_still_ends(tiny_ckpt, tmp_path, capsys):
    """The final norm keeps one dimension and the lm_head's mask row reads it: wherever that
    dimension is positive the mask row wins with certainty (it used to be committed as the
    mask id, and the block never ended)."""
    import json

    from safetensors.torch import load_file, save_file

    from helpers import MASK as REAL_MASK
    from helpers import clone, tide

    where = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    names = ("model.norm.weight", "lm_head.weight")
    ckpt = clone(tiny_ckpt, tmp_path / "masky", copy=tuple(where[n] for n in names))
    for name in names:
        shard = ckpt / where[name]
        tensors = load_file(shard)
        t = torch.zeros_like(tensors[name])
        if name == "lm_head.weight":
            t[REAL_MASK, 0] = 60
        else:
            t[0] = 1
        tensors[name] = t
        save_file(tensors, shard, metadata={"format": "pt"})
    code, out, err = tide(["generate", "Hello there", "-m", str(ckpt), "--device", "cpu",
                           "--gen-length", "40", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["finished"] and res["steps"] <= 2 * 32  # two blocks, each within its bound

"""LLaDA2.2 Levenshtein decoding on scripted logits: the edit scan (DELETE, SPLIT, truncation,
padding, prompt protection), the M2T schedule with new masks, the post-step budget and the final
round, the loop escape, the hard cap; and the decoder around it (stop ids only in committed
generated positions, no edit token in any event or output, final blocks only when stopped)."""

import math

import pytest
import torch

from tidecli.decode.diffusion import DecodeSettings
from tidecli.decode.levenshtein import (
    MAX_BLOCK_STEPS,
    BlockRun,
    EditTokens,
    LevenshteinDecoder,
    Rule,
    edit_scan,
    quota,
    write_block,
)

V, MASK, EOS, END, DEL, SPLIT = 16, 15, 14, 11, 12, 13
E = EditTokens(mask=MASK, delete=DEL, split=SPLIT)


def logits(rows):
    """One row per (token, confidence[, second]): the token gets `conf`, the optional second
    token most of the rest, every other token an equal share of what is left."""
    out = []
    for row in rows:
        tok, conf = row[0], row[1]
        second = row[2] if len(row) > 2 else None
        rest = 1 - conf
        p = torch.full((V,), rest / (V - 1) * (0.1 if second is not None else 1.0))
        if second is not None:
            p[second] = rest * 0.9
        p[tok] = conf
        out.append(torch.log(p))
    return torch.stack(out)


def rule(**kw):
    base = dict(threshold=0.5, editing=0.0, steps=4, max_post_steps=16)
    return Rule(**{**base, **kw})


# ---- the edit scan -----------------------------------------------------------------------------


def test_delete_drops_the_position_and_pads_with_a_new_mask():
    pre = [1, 2, 3, 4]
    out, orig, created = edit_scan(pre, [1, DEL, 3, 4], [False] * 4, 0, E)
    assert out == [1, 3, 4, MASK] and orig == [False] * 4 and created == 1


def test_split_inserts_a_mask_before_the_old_token_and_truncates():
    pre = [1, 2, 3, 4]
    out, _orig, created = edit_scan(pre, [1, SPLIT, 7, 4], [False] * 4, 0, E)
    # position 1 becomes [mask, the token before the write]; position 2 keeps its new token 7;
    # the block is cut back to its length (4 falls off)
    assert out == [1, MASK, 2, 7] and created == 1


def test_mixed_edits_scan_left_to_right():
    pre = [1, 2, 3, 4, 5, 6]
    out, _, created = edit_scan(pre, [DEL, 2, SPLIT, DEL, SPLIT, 6], [False] * 6, 0, E)
    assert out == [2, MASK, 3, MASK, 5, 6] and created == 2
    out, _, created = edit_scan(pre, [DEL, DEL, DEL, 4, 5, 6], [False] * 6, 0, E)
    assert out == [4, 5, 6, MASK, MASK, MASK] and created == 3


def test_split_of_a_mask_keeps_that_original_mask_and_adds_a_new_one():
    pre = [MASK, MASK, MASK]
    out, orig, created = edit_scan(pre, [SPLIT, 9, MASK], [True] * 3, 0, E)
    assert out == [MASK, MASK, 9] and orig == [False, True, False] and created == 1


def test_prompt_positions_never_move_or_change():
    pre = [7, 8, MASK, MASK, MASK, MASK]  # a prompt tail of two tokens, then the reply
    out, orig, _ = edit_scan(pre, [7, 8, DEL, SPLIT, 5, MASK], [False, False] + [True] * 4, 2, E)
    assert out[:2] == [7, 8]
    assert out == [7, 8, MASK, MASK, 5, MASK] and orig == [False, False, False, True, False, True]
    # and a step never writes a prompt position, whatever the logits
    written, m2t, t2t = write_block([7, 8, 1, 2], 2, [3, 4], [0.99, 0.99], mask=MASK,
                                    threshold=0.5, editing=0.0, needed=0, commit_all=False)
    assert written[:2] == [7, 8] and t2t == [2, 3] and m2t == []


# ---- the M2T schedule ----------------------------------------------------------------------------


def test_schedule_quota_and_fallback():
    assert [quota(8, 4, t) for t in range(4)] == [2, 2, 2, 2]
    assert [quota(10, 4, t) for t in range(4)] == [3, 3, 2, 2]
    run = BlockRun([MASK] * 8, 0, E, rule())
    out = run.advance(logits([(5, 0.2 + p / 100) for p in range(8)]))
    assert out.committed == [6, 7]  # nothing above 0.5: the quota's two most confident


def test_masks_created_by_edits_add_to_the_next_quota_and_do_not_restart_it():
    run = BlockRun([MASK] * 8, 0, E, rule())
    # a confident SPLIT at a mask: [new mask, that original mask]; the last original mask is
    # pushed out of the block
    run.advance(logits([(SPLIT, 0.9)] + [(5, 0.1)] * 7))
    assert run.tokens == [MASK, MASK, 5, MASK, MASK, MASK, MASK, MASK]
    assert run.created == 1 and sum(run.orig) == 6
    assert run.needed() == quota(8, 4, 1) + 1 == 3
    out = run.advance(logits([(6, 0.1)] * 8))
    assert len(out.committed) == 3 and run.created == 0
    assert run.n0 == 8  # the schedule keeps the block's original count


def test_after_the_schedule_every_mask_is_committed():
    run = BlockRun([MASK] * 8, 0, E, rule(steps=2))
    for _ in range(2):
        run.advance(logits([(5, 0.1)] * 8))  # 4 + 4 by the schedule
    assert MASK not in run.tokens
    run = BlockRun([MASK] * 8, 0, E, rule(steps=2))
    run.advance(logits([(DEL, 0.9)] * 2 + [(5, 0.1)] * 6))  # two deleted: two new masks
    out = run.advance(logits([(6, 0.1)] * 8))
    assert MASK not in out.tokens  # step 1 is the schedule's last: its quota + the new masks


def test_the_mask_id_is_never_committed():
    run = BlockRun([MASK] * 4, 0, E, rule())
    out = run.advance(logits([(MASK, 0.99, 3)] * 4))
    assert out.committed and all(out.tokens[p] == 3 for p in out.committed)


# ---- bounds --------------------------------------------------------------------------------------


def _flip(tokens, a=3, b=4):
    """Position 0 flips a ↔ b forever; everything else stays."""
    rows = [(t if t != MASK else 5, 0.99) for t in tokens]
    rows[0] = (b if tokens[0] == a else a, 0.99, 9)
    return logits(rows)


def test_post_step_budget_then_a_final_round():
    run = BlockRun([MASK] * 4, 0, E, rule(max_post_steps=3, max_escapes=0))
    outs = [run.advance(logits([(3, 0.99)] * 4))]  # every original mask committed at step 0
    while not run.done:
        outs.append(run.advance(_flip(run.tokens)))
    assert len(outs) == 1 + 3 and outs[-1].final and not any(o.final for o in outs[:-1])


def test_the_final_round_commits_every_mask_and_never_deletes_or_splits():
    run = BlockRun([MASK] * 4, 0, E, rule(max_post_steps=1))
    run.advance(logits([(DEL, 0.99)] + [(3, 0.99)] * 3))  # originals gone; a new mask padded
    assert run.tokens == [3, 3, 3, MASK] and run.next_is_final()
    out = run.advance(logits([(DEL, 0.99, 7), (SPLIT, 0.99, 8), (3, 0.99), (MASK, 0.99, 6)]))
    assert out.final and out.done
    assert out.tokens == [7, 8, 3, 6]  # the runners-up, the mask committed, nothing moved


def test_a_block_that_changes_nothing_with_no_mask_left_is_done():
    run = BlockRun([MASK] * 4, 0, E, rule())
    run.advance(logits([(3, 0.99)] * 4))
    assert not run.done  # the step that commits the last masks is checked once more
    out = run.advance(logits([(3, 0.99)] * 4))
    assert out.done and not out.final and run.step == 2


def test_a_two_state_oscillation_is_escaped_and_ends():
    run = BlockRun([MASK] * 4, 0, E, rule(max_post_steps=8))
    outs = [run.advance(logits([(3, 0.99)] * 4))]
    while not run.done:
        outs.append(run.advance(_flip(run.tokens)))
        assert len(outs) < 50
    escaped = [o for o in outs if o.escaped]
    assert escaped and escaped[0].tokens[0] == 9  # the flipping position's next-best token
    assert run.escapes <= 3 and run.step <= 1 + 8


def test_the_hard_cap_ends_a_block_that_never_settles():
    assert Rule(threshold=0.5, editing=0.0, steps=32, max_post_steps=16).max_steps == \
        MAX_BLOCK_STEPS == 1000
    # a SPLIT every step keeps a mask in the block, the post-step budget is out of reach
    run = BlockRun([MASK] * 4, 0, E, rule(max_steps=6, max_post_steps=10**6, max_escapes=0))
    n = 0
    while not run.done:
        run.advance(logits([(SPLIT, 0.99, 3), (3, 0.99), (3, 0.99), (3, 0.99)]))
        n += 1
        assert n <= 6
    assert n == 6 and MASK not in run.tokens and SPLIT not in run.tokens


# ---- the decoder ---------------------------------------------------------------------------------


class Scripted:
    """reference_logits: per asked row, `script(step, position, tokens)` → (token, conf[, 2nd])."""

    cfg = None
    dtype = torch.float32

    def __init__(self, script):
        self.script = script
        self.calls = 0

    def reference_logits(self, ids, rows, info, *, block_length=None):
        out = logits([self.script(self.calls, pos, ids.tolist()) for pos in rows.tolist()])
        self.calls += 1
        return out


def decode(script, prompt, **kw):
    kw = {"use_cache": False, "decoding": "levenshtein", **kw}
    d = LevenshteinDecoder(Scripted(script), prompt, DecodeSettings(**kw), mask_id=MASK,
                           eos_ids={EOS, END}, edit_ids=(DEL, SPLIT),
                           device=torch.device("cpu"))
    return d, list(d.steps())


def test_presets_and_edit_tokens_never_reach_events_or_output():
    def script(step, pos, ids):  # edits now and then, settling after a few steps
        if step < 6 and (pos + step) % 5 == 0:
            return (DEL if pos % 2 else SPLIT, 0.9, 4)
        return (pos % 7 + 1, 0.95)

    d, events = decode(script, [1, 2, 3], gen_length=16, block_length=8)
    assert d.s.threshold == 0.5 and d.s.editing_threshold == 0.0  # the 2.2 preset
    for ev in events:
        for tok in ev.block_tokens + [t for _, t in ev.committed + ev.edited]:
            assert tok not in (DEL, SPLIT)
    assert d.result.token_ids and not {DEL, SPLIT, MASK} & set(d.result.token_ids)
    assert all(ev.block_done == (i + 1 == len(events) or events[i + 1].block != ev.block)
               for i, ev in enumerate(events))


@pytest.mark.parametrize("stop", [EOS, END])
def test_either_stop_id_ends_generation_only_in_committed_generated_positions(stop):
    def script(step, pos, ids):
        return (stop if pos == 10 else 3, 0.99)

    prompt = [1, 2, EOS, 4, 5]  # a stop id inside the prompt does not count
    d, events = decode(script, prompt, gen_length=24, block_length=4)
    assert d.result.stopped_at_eos and d.result.token_ids == [3] * 5
    assert max(e.block for e in events) == 2  # the block holding position 10, then nothing


def test_stopping_early_returns_only_final_blocks():
    def script(step, pos, ids):
        return (3, 0.99) if pos < 8 else (3, 0.3)

    d = LevenshteinDecoder(Scripted(script), [1, 2, 3, 4],
                           DecodeSettings(gen_length=8, block_length=4, use_cache=False,
                                          decoding="levenshtein"),
                           mask_id=MASK, eos_ids={EOS}, edit_ids=(DEL, SPLIT),
                           device=torch.device("cpu"))
    it = d.steps()
    for ev in it:
        if ev.block == 2 and ev.committed:  # the second block is half written
            break
    res = d.stop_early()
    assert res.token_ids == [3, 3, 3, 3] and not res.finished


def test_every_block_is_bounded_whatever_the_logits():
    def script(step, pos, ids):  # the worst model: splits everything, confidently
        return (SPLIT, 0.99, MASK)

    d, events = decode(script, [1], gen_length=8, block_length=4, max_post_steps=2)
    per_block = {}
    for ev in events:
        per_block[ev.block] = per_block.get(ev.block, 0) + 1
    assert all(n <= 4 + 2 + 1 for n in per_block.values())
    assert len(d.result.token_ids) == 8 and MASK not in d.result.token_ids
    assert math.isfinite(d.result.tokens_per_step)

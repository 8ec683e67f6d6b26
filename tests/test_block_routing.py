"""LLaDA2.2 block routing: the fast router against the reference loop over routing windows, on
random scores, ties, a capacity at or above the expert count, token runs that end (or start)
mid-window; the bias chooses but never weighs; a window never uses more than its capacity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidecli.errors import TideError
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.model.router import block_choice, block_route_reference, route, routing_weights
from tidecli.model.weights import RouterWeights


def _cfg(**kw):
    raw = preset_config("tiny22")
    raw.update({"num_experts": 16, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
                "expert_capacity": 5, "block_size": 4, **kw})
    return config_from_dict(raw)


def _fast(scores, bias, cfg, offset=0):
    choice = scores + bias if bias is not None else scores
    ids = block_choice(choice, capacity=cfg.expert_capacity, window=cfg.block_size,
                       k=cfg.num_experts_per_tok, offset=offset)
    return ids, routing_weights(scores, ids, cfg)


def _check(scores, bias, cfg, offset=0):
    ids, w = _fast(scores, bias, cfg, offset)
    ref_ids, ref_w = block_route_reference(scores, bias, cfg, offset=offset)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(w, ref_w, rtol=1e-6, atol=1e-7)
    return ids


@pytest.mark.parametrize("tokens", [4, 8, 7, 1, 13])  # whole windows, and runs ending mid-window
@pytest.mark.parametrize("seed", range(6))
def test_fast_block_routing_matches_the_reference_loop(tokens, seed):
    cfg = _cfg()
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.1
    ids = _check(scores, bias, cfg)
    for w in range(0, tokens, cfg.block_size):  # each window stays inside its pool
        assert len(set(ids[w: w + cfg.block_size].flatten().tolist())) <= cfg.expert_capacity
    assert all(len(set(row)) == 3 for row in ids.tolist())  # k distinct experts per token


@pytest.mark.parametrize("offset", [1, 3])
def test_a_run_starting_mid_window_routes_its_first_partial_window_alone(offset):
    cfg = _cfg()
    gen = torch.Generator().manual_seed(offset)
    scores = torch.rand(10, 16, generator=gen)
    _check(scores, torch.zeros(16), cfg, offset=offset)
    # the tokens before the first boundary form their own window
    head = cfg.block_size - offset
    alone, _ = _fast(scores[:head], torch.zeros(16), cfg)
    assert torch.equal(_fast(scores, torch.zeros(16), cfg, offset)[0][:head], alone)


def test_ties_go_to_the_lower_expert_id():
    cfg = _cfg()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # scores on a coarse grid: many exact ties, in the pool and per token
        scores = torch.randint(0, 3, (9, 16), generator=gen).float() / 4
        bias = torch.randint(0, 2, (16,), generator=gen).float() / 4
        _check(scores, bias, cfg)
    flat = torch.full((4, 16), 0.5)
    ids, _ = _fast(flat, None, cfg)
    assert ids.tolist() == [[0, 1, 2]] * 4  # all tied: the pool is experts 0..4, first three


@pytest.mark.parametrize("capacity", [16, 40])
def test_capacity_at_or_above_the_experts_is_plain_top_k(capacity):
    cfg = _cfg(expert_capacity=capacity)
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(11, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.1
    ids = _check(scores, bias, cfg)
    plain = torch.sort(scores + bias, dim=-1, descending=True, stable=True).indices[:, :3]
    assert torch.equal(ids, plain)  # no group limit either: n_group/topk_group are not applied


def test_the_bias_chooses_but_never_weighs():
    cfg = _cfg(block_size=2, expert_capacity=3, num_experts_per_tok=2)
    scores = torch.tensor([[0.9, 0.8, 0.1] + [0.0] * 13, [0.7, 0.9, 0.2] + [0.0] * 13])
    bias = torch.zeros(16)
    bias[2] = 1.0  # expert 2 enters every pool and every token's choice through the bias
    ids, w = _fast(scores, bias, cfg)
    _check(scores, bias, cfg)
    assert ids.tolist() == [[2, 0], [2, 1]]
    s = torch.tensor([[0.1, 0.9], [0.2, 0.9]])
    assert torch.allclose(w, s / s.sum(-1, keepdim=True) * 2.5)  # unbiased scores, scaled once
    assert torch.allclose(w.sum(-1), torch.full((2,), 2.5))


def test_route_uses_block_routing_and_sigmoid_scores():
    cfg = _cfg()
    gen = torch.Generator().manual_seed(3)
    w = RouterWeights(weight=torch.randn(16, 64, generator=gen),
                      expert_bias=torch.randn(16, generator=gen) * 0.05)
    x = torch.randn(12, 64, generator=gen).to(torch.bfloat16)
    ids, weights = route(x, w, cfg)
    scores = torch.nn.functional.linear(x.float(), w.weight.float()).sigmoid()
    ref_ids, ref_w = block_route_reference(scores, w.expert_bias, cfg)
    assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_w, rtol=1e-6)
    assert weights.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 20), window=st.integers(1, 8), capacity=st.integers(2, 20),
       k=st.integers(1, 2), offset=st.integers(0, 7), seed=st.integers(0, 2**16),
       coarse=st.booleans())
def test_block_routing_property(tokens, window, capacity, k, offset, seed, coarse):
    cfg = _cfg(block_size=window, expert_capacity=max(capacity, k), num_experts_per_tok=k)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, 16, generator=gen)
    if coarse:
        scores = (scores * 4).floor() / 4
    _check(scores, torch.rand(16, generator=gen) * 0.2, cfg, offset=offset)


def test_config_keys_are_optional_and_checked():
    old = config_from_dict(preset_config("tiny"))
    assert not old.block_routing and old.edit_token_ids is None
    assert old.pool_experts(32) == old.num_experts
    cfg = config_from_dict(preset_config("tiny22"))
    assert cfg.block_routing and cfg.edit_token_ids == (156930, 156931)
    assert cfg.pool_experts(32) == 8 and cfg.pool_experts(64) == 16
    flash = config_from_dict(preset_config("flash22"))
    assert flash.expert_capacity == 48 and flash.block_size == 32
    assert flash.pool_experts(32) == 48
    for bad, what in (({"block_size": 0}, "block_size"),
                      ({"expert_capacity": 2}, "expert_capacity"),
                      ({"split_token_id": 0}, "come together"),
                      ({"split_token_id": 156930}, "both"),
                      ({"delete_token_id": 200000}, "outside")):
        with pytest.raises(TideError, match=what):
            config_from_dict({**preset_config("tiny22"), **bad})

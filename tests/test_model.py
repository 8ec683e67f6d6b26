"""The cached fast path against the slow reference path, on real synthetic checkpoints."""

import pytest
import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings
from tidecli.model.llada2 import KVCache
from tidecli.model.moe import ForwardInfo

from helpers import load_model

MASK, EOS = 156895, 156892


def _generate(model, prompt, **kw):
    s = DecodeSettings(**kw)
    d = BlockDiffusionDecoder(model, prompt, s, mask_id=MASK, eos_ids={EOS},
                              device=torch.device("cpu"))
    events = list(d.steps())
    return d.result, events


@pytest.mark.parametrize("prompt_len,block", [(5, 8), (16, 8), (21, 8), (3, 4), (40, 32)])
def test_cached_path_gives_the_reference_tokens(tiny_ckpt, prompt_len, block):
    model, _ = load_model(tiny_ckpt)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 150000, (prompt_len,), generator=g).tolist()
    fast, ev_fast = _generate(model, prompt, gen_length=20, block_length=block)
    ref, ev_ref = _generate(model, prompt, gen_length=20, block_length=block, use_cache=False)
    assert fast.token_ids == ref.token_ids
    assert [e.committed for e in ev_fast] == [e.committed for e in ev_ref]
    assert len(fast.token_ids) == 20 and fast.steps == ref.steps


def test_cached_path_with_editing_matches_reference(tiny_ckpt_b):
    model, _ = load_model(tiny_ckpt_b)
    prompt = list(range(1000, 1013))
    kw = dict(gen_length=24, block_length=8, threshold=0.9, editing_threshold=0.0,
              max_post_steps=3)
    fast, _ = _generate(model, prompt, **kw)
    ref, _ = _generate(model, prompt, **kw, use_cache=False)
    assert fast.token_ids == ref.token_ids


def test_block_logits_equal_reference_logits(tiny_ckpt):
    """A prompt ending mid-block: cached block logits vs whole-window logits."""
    model, ckpt = load_model(tiny_ckpt)
    bl = 8
    x = torch.randint(0, 150000, (3 * bl,), generator=torch.Generator().manual_seed(1))
    x[19:] = MASK
    cache = KVCache(ckpt.config, 3 * bl, device=torch.device("cpu"), dtype=torch.float32)
    model.prefill(x[:16], cache, ForwardInfo("prefill"), block_length=bl)
    fast = model.block_forward(x[16:24], 16, cache, ForwardInfo("step"))
    ref = model.reference_logits(x, torch.arange(16, 24), ForwardInfo("reference"),
                                 block_length=bl)
    scale = ref.abs().max()
    assert (fast - ref).abs().max() / scale < 1e-5
    # later blocks do not change earlier ones: the reference logits of block 1 ignore block 2
    info = ForwardInfo("reference")
    ref_short = model.reference_logits(x[:16], torch.arange(8, 16), info, block_length=bl)
    ref_long = model.reference_logits(x, torch.arange(8, 16), info, block_length=bl)
    assert (ref_short - ref_long).abs().max() / ref_long.abs().max() < 1e-6


def test_bf16_model_runs_and_is_finite(tiny_ckpt):
    model, _ = load_model(tiny_ckpt, dtype=torch.bfloat16)
    res, events = _generate(model, [5, 6, 7], gen_length=8, block_length=8)
    assert len(res.token_ids) == 8 and all(e.forward_ms >= 0 for e in events)

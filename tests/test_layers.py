import math

import torch

from tidecli.model.layers import Rotary, block_causal_mask, rms_norm


def test_partial_rope_rotates_only_the_first_dims_in_half_pairs():
    rot, hd, theta = 8, 16, 600000.0
    r = Rotary(rot, theta, 64, torch.device("cpu"))
    x = torch.randn(3, 2, hd)
    pos = torch.tensor([0, 5, 17])
    y = r.apply(x, pos)
    assert torch.equal(y[..., rot:], x[..., rot:])  # untouched dims
    assert torch.allclose(y[0], x[0])  # position 0 is the identity
    half = rot // 2
    for t, p in enumerate(pos.tolist()):
        for j in range(half):
            ang = p * theta ** (-2 * j / rot)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[t, :, j], x[t, :, j + half]  # d pairs with d + rot/2
            assert torch.allclose(y[t, :, j], a * c - b * s, atol=1e-5)
            assert torch.allclose(y[t, :, j + half], b * c + a * s, atol=1e-5)


def test_block_causal_mask():
    pos = torch.arange(6)
    m = block_causal_mask(pos, pos, 2)
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)


def test_rms_norm_computes_in_fp32_then_scales():
    x = torch.tensor([[3.0, 4.0]], dtype=torch.bfloat16)
    w = torch.tensor([2.0, 1.0], dtype=torch.bfloat16)
    y = rms_norm(x, w, 1e-6)
    rms = math.sqrt((9 + 16) / 2)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), torch.tensor([[2 * 3 / rms, 4 / rms]]), atol=1e-2)

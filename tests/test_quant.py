"""Compressed expert formats (experts/formats.py, experts/quant.py): the row layouts, the error
bound of each format's quantization, and the torch reference that reads rows back."""

import pytest
import torch

from tidecli.errors import TideError
from tidecli.experts.compute import expert_mlp, pool_views, run_pairs
from tidecli.experts.formats import (
    ALIGN,
    COMPRESSED,
    expert_format,
    expert_row_bytes,
    parse_formats,
)
from tidecli.experts.quant import QMatrix, dequantize_rows, error_bound, quantize_rows

SHAPES = [(64, 32), (256, 128), (128, 64)]


def _rows(s, h, i, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, 3 * h * i, generator=g) * scale).to(torch.bfloat16)


def test_layouts_are_aligned_and_as_small_as_promised():
    for name in COMPRESSED:
        fmt = expert_format(name, hidden=2048, inter=512)
        parts = [p for m in (fmt.gate_up, fmt.down) for p in (m.q, m.scale, m.minimum) if p]
        assert all(p.offset % ALIGN == 0 for p in parts) and fmt.row_bytes % ALIGN == 0
        spans = sorted((p.offset, p.offset + p.nbytes) for p in parts)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
        assert spans[-1][1] <= fmt.row_bytes
    mini = {n: expert_format(n, hidden=2048, inter=512).ratio for n in COMPRESSED}
    assert 1.99 < mini["int8"] < 2.0 and 1.99 < mini["fp8"] <= 2.0
    assert 3.7 < mini["int4"] < 3.8  # 4 bits + an fp16 scale and minimum per 128 weights
    assert expert_row_bytes("bf16", hidden=2048, inter=512) == 6 * 2048 * 512
    assert expert_row_bytes("bf16", hidden=64, inter=32, dtype_bytes=4) == 12 * 64 * 32
    assert "lossy" in expert_format("int4", hidden=64, inter=32).label()


def test_format_names():
    assert parse_formats("bf16, int4,int8,int4") == ["bf16", "int4", "int8"]
    with pytest.raises(TideError, match="unknown --experts-dtype 'int3'"):
        parse_formats("int3")
    with pytest.raises(TideError, match="int4 needs"):
        expert_format("int4", hidden=128, inter=96)


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("h,i", SHAPES)
def test_quantization_error_is_within_the_format_bound(name, h, i):
    w = _rows(4, h, i)
    w[0, :300] = 0  # a zero stretch: a zero scale must not divide by zero
    w[1, : 2 * h * i] = 0.5  # a constant matrix
    w[2, 5] = 3.0  # an outlier takes its channel, group or block's scale
    fmt = expert_format(name, hidden=h, inter=i)
    rows = quantize_rows(w, fmt)
    assert rows.dtype == torch.uint8 and rows.shape == (4, fmt.row_bytes)
    back = dequantize_rows(rows, fmt)
    err = (back - w.float()).abs()
    assert bool((err <= error_bound(w, fmt)).all())
    assert torch.equal(back[0, :256], torch.zeros(256))  # whole zero rows (groups) stay zero
    # typical relative error on Gaussian weights (the README's table quotes these per format)
    rel = float(err[3].norm() / w[3].float().norm())
    assert rel < {"int8": 0.01, "fp8": 0.04, "int4": 0.12}[name]


def test_quantization_is_deterministic_and_pads_with_zeros():
    w = _rows(3, 64, 32, seed=5)
    for name in COMPRESSED:
        fmt = expert_format(name, hidden=64, inter=32)
        a, b = quantize_rows(w, fmt), quantize_rows(w.clone(), fmt)
        assert torch.equal(a, b)
        used = torch.zeros(fmt.row_bytes, dtype=torch.bool)
        for m in (fmt.gate_up, fmt.down):
            for p in (m.q, m.scale, m.minimum):
                if p is not None:
                    used[p.offset: p.offset + p.nbytes] = True
        assert not bool(a[:, ~used].any())


def test_the_loop_and_the_grouped_reference_agree_with_dequantize_then_matmul():
    h, i = 64, 32
    w = _rows(6, h, i, seed=3, scale=0.1)
    x = torch.randn(5, h)
    for name in COMPRESSED:
        fmt = expert_format(name, hidden=h, inter=i)
        gu, dn = pool_views(quantize_rows(w, fmt), h, i, fmt)
        assert isinstance(gu, QMatrix) and gu.shape == (6, 2 * i, h) and dn.shape == (6, h, i)
        ids = torch.tensor([[0, 5], [2, 0], [5, 5], [1, 2], [3, 4]])
        pair_slot = ids.reshape(-1)
        loop = run_pairs("loop", x, pair_slot, gu, dn, 2)
        back = dequantize_rows(quantize_rows(w, fmt), fmt)
        bgu, bdn = pool_views(back, h, i)
        for p, s in enumerate(pair_slot.tolist()):
            want = expert_mlp(x[p // 2][None], bgu[s], bdn[s])[0]
            assert torch.allclose(loop[p], want, atol=1e-6)

"""The dequantizing grouped GEMM (experts/qkernel.py) against the torch reference (dequantize,
then matmul), in Triton's interpreter on the CPU. The interpreter's int → bf16 conversion is
unreliable, so activations are fp32 here; the GPU test (tests/test_gpu.py) runs bf16."""

import os

import pytest
import torch

if torch.cuda.is_available():  # there the compiled kernel runs, in tests/test_gpu.py
    pytest.skip("the interpreter check is for machines without a GPU", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its library follows the mode
pytest.importorskip("triton")

from tidecli.experts.compute import quant_grouped_reference  # noqa: E402
from tidecli.experts.formats import COMPRESSED, expert_format  # noqa: E402
from tidecli.experts.qkernel import quant_grouped_mm  # noqa: E402
from tidecli.experts.quant import quantize_rows, views  # noqa: E402


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("h,i", [(64, 32), (128, 64)])
def test_kernel_matches_the_reference(name, h, i):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(5, 3 * h * i, generator=g) * 0.05).to(torch.bfloat16)
    gu, dn = views(quantize_rows(w, expert_format(name, hidden=h, inter=i)),
                   expert_format(name, hidden=h, inter=i))
    # groups of 3, 0, 20 (two row tiles), 1 and 2 rows; the last 2 rows belong to no group
    offs = torch.tensor([3, 3, 23, 24, 26], dtype=torch.int32)
    for mat, k in ((gu, h), (dn, i)):
        x = torch.randn(28, k, generator=g)
        got = quant_grouped_mm(x, mat, offs)
        want = quant_grouped_reference(x, mat, offs)
        assert got.shape == want.shape == (28, mat.layout.n)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not bool(got[26:].any())  # rows past the last group stay zero


def test_experts_read_in_place_from_a_slice_of_rows():
    """The kernel reads a pool's rows through strided views, and each group its own expert."""
    h, i = 64, 32
    fmt = expert_format("int4", hidden=h, inter=i)
    w = (torch.randn(4, 3 * h * i) * 0.05).to(torch.bfloat16)
    rows = quantize_rows(w, fmt)
    gu, _ = views(rows[1:3], fmt)
    x = torch.randn(4, h)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    got = quant_grouped_mm(x, gu, offs)
    full, _ = views(rows, fmt)
    ref = quant_grouped_reference(x, full.select(torch.tensor([1, 2])), offs)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_tiles_depend_on_the_format_place_and_static_shape_alone():
    """Every tile the runtime may pick keeps BM ≤ 32, the family that gave bitwise the same
    rows on an H200 (tests/test_gpu_quant.py checks it on the GPU)."""
    from tidecli.experts.qkernel import LARGE, SMALL, SMALL_ROWS, tiles_for

    assert tiles_for("int4", 256, 256, streamed=False) == SMALL["int4"]  # a decoding step
    assert tiles_for("int8", SMALL_ROWS * 64 + 1, 64, streamed=False) == LARGE  # a long prompt
    assert tiles_for("fp8", 256, 64, streamed=True) == LARGE  # read once over PCIe
    assert tiles_for("int4", 8, 0, streamed=False) == SMALL["int4"]
    assert all(t.bm <= 32 for t in (*SMALL.values(), LARGE))


@pytest.mark.parametrize("name", [*COMPRESSED, "plain"])
def test_a_fused_expert_pass_matches_the_unfused_ops(name):
    """expert_rows (gather on load, gate and up with their SiLU product in one launch,
    down with a scatter on store) against compute.grouped_rows' torch path on the same pairs:
    rows of groups written where dst says, the dummy row and rows past the groups untouched."""
    from tidecli.experts.compute import grouped_rows_ops, pool_views
    from tidecli.experts.qkernel import expert_rows

    h, i = 128, 64
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(4, 3 * h * i, generator=g) * 0.05).to(torch.bfloat16)
    if name == "plain":  # experts as they are, in the activations' dtype
        gu, dn = pool_views(w.float(), h, i)
    else:
        fmt = expert_format(name, hidden=h, inter=i)
        gu, dn = views(quantize_rows(w, fmt), fmt)
    hidden = torch.randn(9, h, generator=g)
    pairs = 12
    rows = torch.tensor([4, 0, 8, 3, 3, 1, 5, 2, 7, 6, 0, 0])  # token row per sorted pair
    dst = torch.tensor([7, 2, 0, 9, 1, 3, 11, 5, 4, 12, 12, 12])  # 12: the dummy row
    offs = torch.tensor([2, 2, 6, 9], dtype=torch.int32)  # 2, 0, 4, 3 pairs; 9.. in none
    want = torch.full((pairs + 1, h), 7.0)
    grouped_rows_ops(hidden, rows, dst, offs, gu, dn, want)
    got = torch.full((pairs + 1, h), 7.0)
    expert_rows(hidden, rows, dst, offs, gu, dn, got)
    written = dst[:9]
    assert torch.allclose(got[written], want[written], rtol=1e-4, atol=1e-5)
    untouched = torch.ones(pairs + 1, dtype=torch.bool)
    untouched[written] = False
    assert bool((got[untouched] == 7.0).all())


def test_a_two_source_pass_matches_one_pass_per_source_and_fills_the_placed_slots():
    """expert_rows_two: slots of a pool (groups 0..split-1) and experts read from a second
    stack (the rest, rows from the buffer's second half) in one pass, against a pass over
    each; the expert whose table entry is a slot has its rows written into that slot, and
    every other slot keeps its bytes."""
    from tidecli.experts.compute import grouped_rows_ops, pool_views
    from tidecli.experts.qkernel import expert_rows_two

    h, i, p = 128, 64, 6
    g = torch.Generator().manual_seed(5)
    host_buf = (torch.randn(5, 3 * h * i, generator=g) * 0.05)  # 5 experts in "RAM"
    pool_buf = torch.zeros(3, 3 * h * i)
    pool_buf[0], pool_buf[1] = host_buf[2], host_buf[4]  # slots 0, 1 held; slot 2 a victim
    pool_buf[2] = 9.0
    before = pool_buf.clone()
    pool, host = pool_views(pool_buf, h, i), pool_views(host_buf, h, i)
    hidden = torch.randn(4, h, generator=g)
    # held: slot 0 ← 2 pairs, slot 1 ← 1; from RAM: expert 0 ← 2 pairs (placed into slot 2),
    # expert 3 ← 1 pair (read in place); p = 6 pairs, dst 6 the dummy row
    rows = torch.tensor([0, 3, 1, 0, 0, 0, 2, 1, 3, 0, 0, 0])
    dsts = torch.tensor([0, 4, 2, 6, 6, 6, 1, 5, 3, 6, 6, 6])
    offs = torch.tensor([2, 3, 3, 2, 2, 2, 3, 3], dtype=torch.int32)  # 3 slot ends, 5 expert
    table = torch.tensor([2, -1, 0, -1, 1, -1])
    want = torch.full((p + 1, h), 7.0)
    grouped_rows_ops(hidden, rows[:p], dsts[:p], offs[:3], *pool, want)
    grouped_rows_ops(hidden, rows[p:], dsts[p:], offs[3:], *host, want)
    got = torch.full((p + 1, h), 7.0)
    expert_rows_two(hidden, rows, dsts, offs, 3, pool, host, table, got)
    assert torch.allclose(got[:p], want[:p], rtol=1e-4, atol=1e-5)
    assert torch.equal(pool_buf[2], host_buf[0])  # placed: written as it was read
    assert torch.equal(pool_buf[:2], before[:2])  # held slots untouched

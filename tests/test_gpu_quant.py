"""Compressed experts on CUDA: the dequantizing kernel against the torch reference on mini's
shapes, in device and in pinned host memory, and every policy with the same compressed store
gives the resident run's tokens bitwise (one kernel computes every expert). Skipped without a
GPU."""

import pytest
import torch

from tidecli.experts.compute import quant_grouped_reference
from tidecli.experts.formats import COMPRESSED, expert_format
from tidecli.experts.qkernel import qkernel_available, quant_grouped_mm
from tidecli.experts.quant import quantize_rows, views
from tidecli.model.program import StepPrograms

from helpers import check_tables, cuda_model, decode_cuda

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _need(name):
    if not qkernel_available(CUDA, torch.bfloat16, name):
        pytest.skip(f"no {name} kernel here (Triton, or sm89+ for fp8)")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize("pinned", [False, True])
def test_kernel_matches_the_reference_on_mini_shapes(name, pinned):
    from tidecli.experts.gather import device_view

    _need(name)
    h, i, e = 2048, 512, 12
    fmt = expert_format(name, hidden=h, inter=i)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(e, 3 * h * i, device="cuda", generator=g) * 0.02).bfloat16()
    rows = quantize_rows(w, fmt)
    if pinned:  # streamed misses: the kernel reads the rows over PCIe
        host = rows.cpu().pin_memory()
        rows = device_view(host, CUDA)
    gu, dn = views(rows, fmt)
    counts = torch.tensor([3, 0, 40, 1, 0, 7, 16, 2, 0, 5, 33, 1])
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    m = int(counts.sum()) + 3  # 3 rows past the last group
    for mat, k in ((gu, h), (dn, i)):
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        got = quant_grouped_mm(x, mat, offs)
        want = quant_grouped_reference(x, mat, offs)
        assert _rel(got, want) < 5e-3
        assert not bool(got[-3:].any())
        assert torch.equal(got, quant_grouped_mm(x, mat, offs))  # deterministic


@pytest.mark.parametrize("name", COMPRESSED)
def test_device_and_streamed_tiles_give_bitwise_the_same_rows(name):
    """An expert read in place from pinned RAM (streamed misses) runs with the large tiles,
    the same expert in a slot with the format's small ones (or the large, for long prompts):
    every policy's tokens are the resident run's only if all give the same rows, bit for bit."""
    from tidecli.experts.qkernel import LARGE, SMALL, Tiles

    _need(name)
    h, i = 2048, 512
    fmt = expert_format(name, hidden=h, inter=i)
    g = torch.Generator(device="cuda").manual_seed(2)
    counts = torch.tensor([3, 0, 40, 1, 0, 7, 16, 2, 0, 5, 33, 1, 64, 4])
    w = (torch.randn(counts.numel(), 3 * h * i, device="cuda", generator=g) * 0.02).bfloat16()
    gu, dn = views(quantize_rows(w, fmt), fmt)
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    m = int(counts.sum()) + 3
    for mat, k in ((gu, h), (dn, i)):
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        want = quant_grouped_mm(x, mat, offs, tiles=LARGE)
        for tiles in (SMALL[name], Tiles(16, 64), Tiles(16, 128), Tiles(32, 64)):
            assert torch.equal(quant_grouped_mm(x, mat, offs, tiles=tiles), want), tiles
        assert torch.equal(quant_grouped_mm(x, mat, offs), want)  # the call's own choice


@pytest.mark.parametrize("name", [*COMPRESSED, "plain"])
def test_the_fused_expert_pass_gives_the_same_rows_with_every_tile(name):
    """expert_rows on mini's shapes, pairs of one step scattered over 14 experts: close to
    the unfused ops, and bitwise the same with every tile the runtime picks, experts in device
    memory or read in place from pinned RAM; compressed experts, and plain bf16 ones."""
    from tidecli.experts.compute import grouped_rows_ops, pool_views
    from tidecli.experts.gather import device_view
    from tidecli.experts.qkernel import LARGE, SMALL, Tiles, expert_rows

    _need(name)
    h, i = 2048, 512
    fmt = expert_format(name, hidden=h, inter=i) if name != "plain" else None
    g = torch.Generator(device="cuda").manual_seed(4)
    counts = torch.tensor([3, 0, 40, 1, 0, 7, 16, 2, 0, 5, 33, 1, 64, 4])
    rows_q = (torch.randn(counts.numel(), 3 * h * i, device="cuda", generator=g) * 0.02).bfloat16()
    if fmt is not None:
        rows_q = quantize_rows(rows_q, fmt)
    pairs = int(counts.sum()) + 3  # 3 pairs in no group
    hidden = torch.randn(pairs // 2 + 1, h, device="cuda", generator=g).bfloat16()
    rows = torch.randint(0, hidden.shape[0], (pairs,), device="cuda", generator=g)
    dst = torch.randperm(pairs, device="cuda", generator=g)
    dst[-3:] = pairs  # the dummy row
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    host = device_view(rows_q.cpu().pin_memory(), CUDA)
    want = None
    for buf in (rows_q, host):
        gu, dn = views(buf, fmt) if fmt is not None else pool_views(buf, h, i)
        for tiles in (LARGE, SMALL[name], Tiles(16, 64), Tiles(16, 128), Tiles(32, 64)):
            got = torch.zeros((pairs + 1, h), device="cuda", dtype=torch.bfloat16)
            expert_rows(hidden, rows, dst, offs, gu, dn, got, tiles=tiles)
            if want is None:
                want = got
                ops = torch.zeros_like(got)
                grouped_rows_ops(hidden, rows, dst, offs, gu, dn, ops)
                assert _rel(got[:-1], ops[:-1]) < 1e-2
                assert not bool(got[-1].any())  # the dummy row: never written
            assert torch.equal(got, want), (tiles, buf is host)


def _tokens(tiny_ckpt, name, make):
    m = StepPrograms(cuda_model(tiny_ckpt, make))
    out = decode_cuda(m, list(range(2000, 2045)), gen_length=96).token_ids
    s = m.experts.run_stats.summary()
    if hasattr(m.experts, "through"):  # streamed: the slots hold exactly the store's rows
        check_tables(m.experts)
    m.experts.close()
    return out, s


@pytest.mark.parametrize("name", COMPRESSED)
def test_every_policy_gives_the_resident_tokens_bitwise(tiny_ckpt, name):
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.policies import LruPolicy, StaticPolicy, TideOptions, TidePolicy
    from tidecli.experts.qstore import CompressedHostStore, load_compressed_pools
    from tidecli.experts.runtime import ResidentRuntime
    from tidecli.experts.stream import StreamRuntime

    _need(name)
    dt = torch.bfloat16

    def fmt_of(ckpt):
        cfg = ckpt.config
        return expert_format(name, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)

    def resident(ckpt):
        fmt = fmt_of(ckpt)
        rt = ResidentRuntime(ckpt.config, load_compressed_pools(ckpt, fmt, device=CUDA),
                             device=CUDA, dtype=dt, fmt=fmt)
        assert rt.kernel == "grouped_mm"
        return rt

    def pooled(policy, b, kind):
        def make(ckpt):
            store = CompressedHostStore(ckpt, fmt_of(ckpt), pin=True, device=CUDA)
            budgets = {layer: b for layer in ckpt.config.moe_layers}
            if kind == "stream":
                return StreamRuntime(ckpt.config, store, budgets, policy(), device=CUDA,
                                     dtype=dt)
            return OffloadRuntime(ckpt.config, store, budgets, policy(), device=CUDA,
                                  dtype=dt, misses=kind, scratch_slots=4)
        return make

    ref, _ = _tokens(tiny_ckpt, name, resident)
    cases = [(LruPolicy, 4, "cpu"), (lambda: TidePolicy(TideOptions(tau=3)), 6, "gpu"),
             (StaticPolicy, 6, "stream"), (lambda: TidePolicy(TideOptions(tau=1)), 6, "stream"),
             (lambda: TidePolicy(TideOptions(tau=3)), 0, "stream")]
    for policy, b, kind in cases:
        out, s = _tokens(tiny_ckpt, name, pooled(policy, b, kind))
        assert out == ref, (name, kind, b)
        assert s["cpu_calls"] == 0


def test_a_two_source_pass_gives_each_source_passs_rows_and_fills_the_placed_slots():
    """expert_rows_two on mini's shapes: slots in device memory and experts read in place from
    pinned RAM in one pass give bitwise the rows of one pass per source (the tiles of reads
    over PCIe), and the experts placed by it land in their slots byte for byte (plain bf16
    experts: compressed ones keep a gather and a third pass)."""
    from tidecli.experts.compute import pool_views
    from tidecli.experts.gather import device_view
    from tidecli.experts.qkernel import expert_rows, expert_rows_two

    _need("plain")
    h, i, e, b = 2048, 512, 12, 5
    g = torch.Generator(device="cuda").manual_seed(6)
    store = (torch.randn(e, 3 * h * i, device="cuda", generator=g) * 0.02).bfloat16()
    host = device_view(store.cpu().pin_memory(), CUDA)
    pool_buf = torch.zeros((b, store.shape[1]), device="cuda", dtype=store.dtype)
    for slot, ex in ((0, 3), (1, 7), (3, 1)):  # held; slots 2 and 4 are victims
        pool_buf[slot] = store[ex]
    pcounts = torch.tensor([4, 9, 0, 1, 0])  # pairs per slot
    hcounts = torch.tensor([0, 0, 2, 0, 0, 17, 0, 0, 1, 0, 0, 3])  # per expert from RAM
    table = torch.full((e + 1,), -1, device="cuda")
    table[3], table[7], table[1] = 0, 1, 3
    table[5], table[11] = 2, 4  # placed now: written through; 2 and 8 read in place
    p = 40
    hidden = torch.randn(16, h, device="cuda", generator=g).bfloat16()
    np_, nh = int(pcounts.sum()), int(hcounts.sum())
    rows = torch.zeros(2 * p, dtype=torch.long, device="cuda")
    dsts = torch.full((2 * p,), p, dtype=torch.long, device="cuda")
    rows[:np_] = torch.randint(0, 16, (np_,), device="cuda", generator=g)
    rows[p:p + nh] = torch.randint(0, 16, (nh,), device="cuda", generator=g)
    perm = torch.randperm(p, device="cuda", generator=g)
    dsts[:np_], dsts[p:p + nh] = perm[:np_], perm[np_:np_ + nh]
    offs = torch.cat([pcounts.cumsum(0), hcounts.cumsum(0)]).to(torch.int32).cuda()
    pool, hv = pool_views(pool_buf, h, i), pool_views(host, h, i)
    want = torch.zeros((p + 1, h), device="cuda", dtype=torch.bfloat16)
    expert_rows(hidden, rows[:p], dsts[:p], offs[:b], *pool, want, streamed=True)  # its tiles
    expert_rows(hidden, rows[p:], dsts[p:], offs[b:], *hv, want, streamed=True)
    before = pool_buf.clone()
    got = torch.zeros_like(want)
    expert_rows_two(hidden, rows, dsts, offs, b, pool, hv, table, got)
    assert torch.equal(got, want)
    assert torch.equal(pool_buf[2], store[5]) and torch.equal(pool_buf[4], store[11])
    assert torch.equal(pool_buf[[0, 1, 3]], before[[0, 1, 3]])

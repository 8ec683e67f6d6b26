"""A grouped GEMM over compressed experts that dequantizes in registers (Triton).

Called as `torch._grouped_mm` is in experts/compute.py: rows of `x` sorted by group, `offs` the
group ends, one expert per group; group g's rows are multiplied by expert g's matrixᵀ. The
weights are read in their compressed form, straight from the slot pool or (streamed misses) from
pinned host memory mapped into the GPU, so a step moves the compressed bytes only.

One program computes one group's rows (in tiles of BM) for BN output channels, looping over the
inputs; groups without rows read nothing. Per format, in fp32 accumulators:
- int8: Σ x·q over every input, times the channel's scale at the end;
- fp8: per 128-input block, Σ x·q times the block's scale (e4m3 converts to bf16 exactly);
- int4: per group of inputs, s·Σ x·q + m·Σ x (the two nibble halves of a group are two
  contiguous input slices, experts/formats.py), so only the 4-bit values enter the dot. They
  enter it in the activations' dtype, built from exponent bits (`nib`) rather than converted:
  the same values, 10 % less time per expert at 1–4 tokens (docs/benchmarks.md section 18).
Tiles (`tiles_for`): a call's tiles depend only on the format, where the weights are read
from and the call's static shape, never on the routing. Every tile choice here keeps BM ≤ 32:
on an H200 every such tile gave bitwise the same rows (the same MMA instructions along the same
loop over the inputs; BM 64 switches to Hopper's warpgroup MMA and rounds differently), so an
expert read in place from pinned RAM and the same expert in a slot give the same rows, and
every policy keeps the resident run's tokens. The GPU tests check it. Small tiles (BM 16) serve
decoding steps, a few rows per expert; BM 32 serves long prompts and the reads over PCIe, which
then cross the link once per expert. `quant_grouped_reference` in compute.py is the plain
version; the tests hold the kernel to it in Triton's interpreter.

`expert_rows` is a whole expert pass (compute.grouped_rows) in two launches of the same kernel:
the pairs' token rows gathered as they load, gate and up in one program with the SiLU product
written out, then down with each row stored where its pair goes. It also runs experts kept in
the activations' dtype ("plain": bf16 or fp16 stacks, no scales), where the unfused pass is six
launches (index_select, two torch._grouped_mm, SiLU, product, index_copy); `PLAIN` switches
that on (docs/benchmarks.md section 24 measures both).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tidecli.experts.quant import QMatrix
from tidecli.model.triton_util import next_pow2, triton_importable

_CODE = {"int8": 0, "fp8": 1, "int4": 2, "plain": 3}
PLAIN = True  # uncompressed experts on CUDA take expert_rows (False: the unfused torch ops)


@dataclass(frozen=True)
class Tiles:
    """Rows and output channels per program, warps and pipeline stages."""

    bm: int = 32
    bn: int = 128
    warps: int = 4
    stages: int = 3


# (see the docstring; tools/bench/qkernel_bench.py times the alternatives and checks that they
# agree bitwise). Device memory, at most SMALL_ROWS rows per expert on average: the fastest of
# the sweep per format at 4 rows per expert (an H200, docs/benchmarks.md section 15)
SMALL = {"int8": Tiles(16, 64), "fp8": Tiles(16, 64), "int4": Tiles(16, 128),
         "plain": Tiles(16, 64)}
SMALL_ROWS = 8
LARGE = Tiles(32, 128)  # more rows per expert, and every read over PCIe


def tiles_for(fmt: str, rows: int, groups: int, *, streamed: bool) -> Tiles:
    """The tiles of one call: `rows` and `groups` are its static shape (x's rows, w's experts)."""
    if streamed or rows > SMALL_ROWS * max(1, groups):
        return LARGE
    return SMALL[fmt]


def qkernel_available(device: torch.device, dtype: torch.dtype, fmt: str | None = None) -> bool:
    """On CUDA with Triton, for bf16 or fp16 activations (fp8 needs sm89+ to convert e4m3)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not triton_importable():
        return False
    if fmt == "fp8":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    if fmt in (None, "plain") and dtype == torch.bfloat16:  # Triton's bf16 dot: sm80+
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def plain_rows_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether uncompressed experts in `dtype` take `expert_rows` on `device` (PLAIN on)."""
    return PLAIN and _plain_ok(torch.device(device), dtype)


@functools.cache
def _plain_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return qkernel_available(device, dtype, "plain")


@functools.cache
def _kernel():  # built on first use: Triton is imported only then
    import triton
    import triton.language as tl

    @triton.jit
    def nib(v, dtype: tl.constexpr, MAGIC: tl.constexpr):
        # 4-bit values 0..15 as `dtype`, exactly. MAGIC: the bits of 2^e (e: the mantissa's
        # width: 7 in bf16, 10 in fp16, 23 in fp32); v OR-ed into its low mantissa bits gives
        # 2^e + v, and subtracting 2^e leaves v, with no integer-to-float conversion. MAGIC 0:
        # convert (INT4_UNPACK "convert", or a dtype without a magic number)
        if MAGIC == 0:
            return v.to(dtype)
        elif dtype == tl.float32:
            m = (v.to(tl.int32) | MAGIC).to(tl.float32, bitcast=True)
            return m - 8388608.0
        else:
            m = (v.to(tl.int16) | MAGIC).to(tl.int16).to(dtype, bitcast=True)
            return m - tl.full(m.shape, 128.0 if MAGIC == 0x4300 else 1024.0, dtype)

    globals()["nib"] = nib  # the interpreter and the compiler look names up in the module

    @triton.jit
    def qgmm(x, rows, q, sc, mn, offs, out, dst, N, UP, K, sxm, sqg, ssg, som, KB,
             q2, sqg2, tab, SPLIT, BASE2,
             FMT: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
             SCATTER: tl.constexpr, SWIGLU: tl.constexpr, MAGIC: tl.constexpr,
             TWO: tl.constexpr):
        # GATHER: row m of the group reads x[rows[m]]; SCATTER: it is written to out[dst[m]];
        # SWIGLU: channels rn and rn + UP are an expert's gate and up, and the program writes
        # silu(gate)·up, each rounded to out's dtype as the unfused ops round it.
        # TWO (plain stacks only): groups from SPLIT on are experts g - SPLIT of q2 (pinned
        # RAM), their rows from BASE2 on with group ends relative to it; one whose slot in
        # `tab` is set writes the weights it reads into that slot of q as well
        g = tl.program_id(0)
        pn = tl.program_id(1)
        start = tl.load(offs + g - 1, mask=g > 0, other=0)
        end = tl.load(offs + g)
        rn = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        ru = rn + UP
        nmask = rn < N
        wq = q + g.to(tl.int64) * sqg
        wt = wq
        thr = g * 0  # 1: write the weights read into slot `wt` (an int: the interpreter's
        # scalar comparisons do not combine with a mask)
        if TWO:
            if g >= SPLIT:
                e = g - SPLIT
                start = BASE2 + tl.load(offs + g - 1, mask=e > 0, other=0)
                end = BASE2 + tl.load(offs + g)
                wq = q2 + e.to(tl.int64) * sqg2
                slot = tl.load(tab + e)
                thr = (slot >= 0).to(tl.int32)
                wt = q + tl.maximum(slot, 0) * sqg
        tk = (tl.arange(0, BK) * 0 + thr) > 0  # as a vector: masks the writes
        ws = sc + g.to(tl.int64) * ssg
        wm = mn + g.to(tl.int64) * ssg
        for m0 in range(start, end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            mmask = rm < end
            if GATHER:
                src = tl.load(rows + rm, mask=mmask, other=0)
            else:
                src = rm
            xrow = x + src.to(tl.int64)[:, None] * sxm
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if FMT == 2:  # int4: one group per step, its two nibble halves (FMT 3: plain)
                HALF: tl.constexpr = GROUP // 2
                kh = tl.arange(0, HALF)
                for k0 in range(0, K, GROUP):
                    xlo = tl.load(xrow + (k0 + kh)[None, :], mask=mmask[:, None], other=0.0)
                    xhi = tl.load(xrow + (k0 + HALF + kh)[None, :], mask=mmask[:, None],
                                  other=0.0)
                    xsum = tl.sum(xlo.to(tl.float32), axis=1) + tl.sum(xhi.to(tl.float32), axis=1)
                    gi = k0 // GROUP
                    p = tl.load(wq + rn[None, :] * (K // 2) + (k0 // 2 + kh)[:, None],
                                mask=nmask[None, :], other=0)
                    part = tl.dot(xlo, nib(p & 15, xlo.dtype, MAGIC)) + \
                        tl.dot(xhi, nib(p >> 4, xlo.dtype, MAGIC))
                    s = tl.load(ws + rn * (K // GROUP) + gi, mask=nmask, other=0.0).to(tl.float32)
                    m = tl.load(wm + rn * (K // GROUP) + gi, mask=nmask, other=0.0).to(tl.float32)
                    acc += part * s[None, :] + xsum[:, None] * m[None, :]
                    if SWIGLU:
                        p = tl.load(wq + ru[None, :] * (K // 2) + (k0 // 2 + kh)[:, None],
                                    mask=nmask[None, :], other=0)
                        part = tl.dot(xlo, nib(p & 15, xlo.dtype, MAGIC)) + \
                            tl.dot(xhi, nib(p >> 4, xlo.dtype, MAGIC))
                        s = tl.load(ws + ru * (K // GROUP) + gi, mask=nmask,
                                    other=0.0).to(tl.float32)
                        m = tl.load(wm + ru * (K // GROUP) + gi, mask=nmask,
                                    other=0.0).to(tl.float32)
                        acc2 += part * s[None, :] + xsum[:, None] * m[None, :]
            else:
                for k0 in range(0, K, BK):
                    rk = k0 + tl.arange(0, BK)
                    kmask = rk < K
                    xv = tl.load(xrow + rk[None, :], mask=mmask[:, None] & kmask[None, :],
                                 other=0.0)
                    w = tl.load(wq + rn[None, :] * K + rk[:, None],
                                mask=nmask[None, :] & kmask[:, None], other=0.0)
                    if TWO:
                        tl.store(wt + rn[None, :] * K + rk[:, None], w,
                                 mask=nmask[None, :] & (kmask & tk)[:, None])
                    part = tl.dot(xv, w.to(xv.dtype))
                    if FMT == 1:  # fp8: the 128×128 block's scale, per output channel
                        s = tl.load(ws + (rn // GROUP) * KB + k0 // GROUP, mask=nmask, other=0.0)
                        acc += part * s[None, :]
                    else:
                        acc += part
                    if SWIGLU:
                        w = tl.load(wq + ru[None, :] * K + rk[:, None],
                                    mask=nmask[None, :] & kmask[:, None], other=0.0)
                        if TWO:
                            tl.store(wt + ru[None, :] * K + rk[:, None], w,
                                     mask=nmask[None, :] & (kmask & tk)[:, None])
                        part = tl.dot(xv, w.to(xv.dtype))
                        if FMT == 1:
                            s = tl.load(ws + (ru // GROUP) * KB + k0 // GROUP, mask=nmask,
                                        other=0.0)
                            acc2 += part * s[None, :]
                        else:
                            acc2 += part
                if FMT == 0:  # int8: one scale per output channel
                    s = tl.load(ws + rn, mask=nmask, other=0.0)
                    acc = acc * s[None, :]
                    if SWIGLU:
                        s = tl.load(ws + ru, mask=nmask, other=0.0)
                        acc2 = acc2 * s[None, :]
            if SWIGLU:
                gate = acc.to(out.dtype.element_ty).to(tl.float32)
                up = acc2.to(out.dtype.element_ty).to(tl.float32)
                act = (gate / (1.0 + tl.exp(-gate))).to(out.dtype.element_ty).to(tl.float32)
                acc = act * up
            if SCATTER:
                orow = tl.load(dst + rm, mask=mmask, other=0)
            else:
                orow = rm
            tl.store(out + orow.to(tl.int64)[:, None] * som + rn[None, :],
                     acc.to(out.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    return (qgmm, triton.cdiv)


# int4 values enter the dot as the activations' dtype: "bits" builds them from the exponent bits
# of 2^e (no conversion instruction), "convert" converts them; both give the same values, so the
# same rows. tools/bench/qkernel_bench.py --unpack times the two
INT4_UNPACK = "bits"
_MAGIC = {torch.bfloat16: 0x4300, torch.float16: 0x6400, torch.float32: 0x4B000000}


def _magic(dtype: torch.dtype) -> int:
    return _MAGIC.get(dtype, 0) if INT4_UNPACK == "bits" else 0


Weights = torch.Tensor | QMatrix  # a stack of experts' matrices [S, n, k]


def _parts(w: Weights) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    """(format, values, scales, minima, group, n, k) of a stack; a plain stack [S, n, k] must
    be contiguous within each expert (the pools' views are) and passes itself for the scales,
    which the kernel then never reads."""
    if isinstance(w, QMatrix):
        lay = w.layout
        mn = w.minimum if w.minimum is not None else w.scale
        return w.fmt, w.q, w.scale, mn, lay.group, lay.n, lay.k
    _, n, k = w.shape
    if w.stride(2) != 1 or w.stride(1) != k:
        raise ValueError("expert_rows needs each expert's matrix contiguous")
    return "plain", w, w, w, 1, n, k


@dataclass(frozen=True)
class Second:
    """A two-source pass's second stack (experts in pinned RAM): groups from `split` on read
    expert g - split of `w`, their rows from `base` on; `table` [experts] the slot each one's
    weights are written into as they are read (-1: none)."""

    w: torch.Tensor
    split: int
    base: int
    table: torch.Tensor


def _launch(x: torch.Tensor, rows: torch.Tensor | None, w: Weights, offs: torch.Tensor,
            out: torch.Tensor, dst: torch.Tensor | None, n: int, up: int, t: Tiles,
            second: Second | None = None) -> None:
    kernel, cdiv = _kernel()
    fmt, q, scale, mn, group, _, k = _parts(w)
    kb = -(-k // group) if fmt == "fp8" else 0
    bk = max(16, min(128, next_pow2(k)))
    groups = q.shape[0]
    q2, sqg2, tab, split, base = q, 0, offs, 0, 0
    if second is not None:
        q2 = _parts(second.w)[1]
        groups = second.split + q2.shape[0]
        sqg2, tab, split, base = q2.stride(0), second.table, second.split, second.base
    kernel[(groups, cdiv(n, t.bn))](
        x, rows if rows is not None else offs, q, scale, mn, offs, out,
        dst if dst is not None else offs, n, up, k, x.stride(0), q.stride(0),
        scale.stride(0) if fmt != "plain" else 0, out.stride(0), kb, q2, sqg2, tab, split, base,
        FMT=_CODE[fmt], GROUP=group, BK=bk, BLOCK_M=t.bm, BLOCK_N=t.bn, GATHER=rows is not None,
        SCATTER=dst is not None, SWIGLU=up > 0, MAGIC=_magic(x.dtype), TWO=second is not None,
        num_warps=t.warps, num_stages=t.stages)


def quant_grouped_mm(x: torch.Tensor, w: QMatrix, offs: torch.Tensor, *,
                     streamed: bool = False, tiles: Tiles | None = None) -> torch.Tensor:
    """[M, k] rows sorted by group × w (G experts, [n, k] each) → [M, n] in x's dtype; rows past
    the last group are zero. `streamed`: w is read in place from pinned host memory. No host
    sync (graph-capturable)."""
    n = w.layout.n
    g = w.q.shape[0]
    out = torch.zeros((x.shape[0], n), dtype=x.dtype, device=x.device)
    if g == 0 or x.shape[0] == 0:
        return out
    x = x.contiguous()
    _launch(x, None, w, offs, out, None, n, 0,
            tiles or tiles_for(w.fmt, x.shape[0], g, streamed=streamed))
    return out


def expert_rows(hidden: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor,
                offs: torch.Tensor, gate_up: Weights, down: Weights, out: torch.Tensor, *,
                streamed: bool = False, tiles: Tiles | None = None) -> None:
    """`compute.grouped_rows` in two launches: the first reads each pair's token row where it
    lies (rows), multiplies it by its expert's gate and up and writes silu(gate)·up; the second
    multiplies that by down and writes each pair's row where it goes (dst). Entries past the
    last group are read and written by no program. The unfused ops' index_select, SiLU,
    product and index_copy were four more launches per call, each over every pair whatever the
    groups held. Compressed stacks or plain ones. No host sync (graph-capturable)."""
    fmt, q, *_ = _parts(gate_up)
    m, g = rows.shape[0], q.shape[0]
    if g == 0 or m == 0:
        return
    inter = _parts(down)[6]
    hidden = hidden.contiguous()
    t = tiles or tiles_for(fmt, m, g, streamed=streamed)
    act = torch.empty((m, inter), dtype=hidden.dtype, device=hidden.device)
    # a program of the first launch computes BN gate and BN up channels: half the width keeps
    # as many programs as the unfused gate_up had (64 stays in the tiles checked bitwise)
    half = t if tiles is not None else Tiles(t.bm, max(64, t.bn // 2), t.warps, t.stages)
    _launch(hidden, rows, gate_up, offs, act, None, inter, inter, half)
    _launch(act, None, down, offs, out, dst, _parts(down)[5], 0, t)


def expert_rows_two(hidden: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor,
                    offs: torch.Tensor, split: int, pool: tuple[torch.Tensor, torch.Tensor],
                    host: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor,
                    out: torch.Tensor) -> None:
    """Two expert passes in one (plain stacks): groups 0..split-1 are slots of `pool` (rows
    from 0, `offs[:split]` their ends), the rest experts of `host`, read in place from pinned
    RAM (rows from rows.shape[0] // 2, `offs[split:]` their ends relative to that). An
    expert read from RAM whose entry in `table` is a slot has its weights written into that
    slot as they are read: a placed expert crosses PCIe once, into the registers that use it
    and into its slot. The tiles are those of reads over PCIe (BM 32), in the family that
    gives bitwise the same rows from either source, so a row is what either pass alone gives.
    No host sync (graph-capturable)."""
    if isinstance(pool[0], QMatrix) or isinstance(host[0], QMatrix):
        raise ValueError("expert_rows_two takes plain stacks (compressed ones: expert_rows)")
    if rows.shape[0] == 0:
        return
    inter = _parts(pool[1])[6]
    hidden = hidden.contiguous()
    t = LARGE
    act = torch.empty((rows.shape[0], inter), dtype=hidden.dtype, device=hidden.device)
    base = rows.shape[0] // 2
    _launch(hidden, rows, pool[0], offs, act, None, inter, inter,
            Tiles(t.bm, max(64, t.bn // 2), t.warps, t.stages),
            Second(host[0], split, base, table))
    _launch(act, None, pool[1], offs, out, dst, _parts(pool[1])[5], 0, t,
            Second(host[1], split, base, table))

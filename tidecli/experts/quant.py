"""Quantizing expert rows into a compressed format (experts/formats.py) and the torch reference
that reads them back: `dequantize`, then an ordinary matmul.

`QMatrix` is one quantized matrix of a stack of experts, as views into their byte rows (no
copy); the slot pools, the host store and the kernels all pass it where a bf16 path passes the
stacked weight tensor. The quantization runs in fp32 on whatever device the rows are on; the
results are written once into a cache (experts/qcache.py) and read from there ever after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidecli.experts.formats import FP8_MAX, ExpertFormat, MatrixLayout, Part


def _part(buf: torch.Tensor, p: Part) -> torch.Tensor:
    """The view of part `p` in every row of `buf` [S, row bytes] (uint8): [S, *p.shape]."""
    s = buf.shape[0]
    raw = buf[:, p.offset: p.offset + p.nbytes]
    return raw.view(getattr(torch, p.dtype)).view(s, *p.shape)


@dataclass(frozen=True)
class QMatrix:
    """A quantized matrix [S, n, k] of S experts: values `q`, scales and (int4) minima, each a
    view [S, ...] into the experts' rows."""

    fmt: str
    layout: MatrixLayout
    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.q.shape[0], self.layout.n, self.layout.k)

    @property
    def device(self) -> torch.device:
        return self.q.device

    def select(self, idx: int | torch.Tensor) -> QMatrix:
        """The experts `idx` (an index or an index tensor) as a stack of their own."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        m = self.minimum[idx] if self.minimum is not None else None
        return QMatrix(self.fmt, self.layout, self.q[idx], self.scale[idx], m)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[S, n, k] in `dtype`, computed in fp32 (the reference every kernel is tested against)."""
        lay = self.layout
        s = self.q.shape[0]
        if self.fmt == "int8":
            w = self.q.float() * self.scale[..., None]
        elif self.fmt == "fp8":
            b = lay.group
            if lay.n % b == 0 and lay.k % b == 0:  # whole blocks: the scales broadcast
                blocks = self.q.float().view(s, lay.n // b, b, lay.k // b, b)
                w = (blocks * self.scale[:, :, None, :, None]).view(s, lay.n, lay.k)
            else:
                sc = self.scale.repeat_interleave(b, 1).repeat_interleave(b, 2)
                w = self.q.float() * sc[:, : lay.n, : lay.k]
        else:  # int4: byte j of a group holds input j (low nibble) and j + g/2 (high nibble)
            g = lay.group
            p = self.q.view(s, lay.n, lay.k // g, g // 2)
            q = torch.cat([p & 15, p >> 4], dim=-1).float()  # [S, n, groups, g]
            w = q * self.scale.float()[..., None] + self.minimum.float()[..., None]
            w = w.view(s, lay.n, lay.k)
        return w.to(dtype)


def views(buf: torch.Tensor, fmt: ExpertFormat) -> tuple[QMatrix, QMatrix]:
    """buf [S, row bytes] (uint8) → (gate_up [S, 2I, H], down [S, H, I]) as QMatrix views."""
    out = []
    for lay in (fmt.gate_up, fmt.down):
        m = _part(buf, lay.minimum) if lay.minimum is not None else None
        out.append(QMatrix(fmt.name, lay, _part(buf, lay.q), _part(buf, lay.scale), m))
    return out[0], out[1]


def _quantize_matrix(w: torch.Tensor, fmt: str, lay: MatrixLayout) -> dict[str, torch.Tensor]:
    """w [S, n, k] fp32 → the parts of `lay` (values, scale, minimum)."""
    s, n, k = w.shape
    if fmt == "int8":
        amax = w.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}
    if fmt == "fp8":
        b = lay.group
        nb, kb = -(-n // b), -(-k // b)
        padded = torch.zeros((s, nb * b, kb * b), dtype=w.dtype, device=w.device)
        padded[:, :n, :k] = w
        blocks = padded.view(s, nb, b, kb, b)
        amax = blocks.abs().amax(dim=(2, 4))  # [S, nb, kb]
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q = (blocks / scale[:, :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        q = q.view(s, nb * b, kb * b)[:, :n, :k].to(torch.float8_e4m3fn)
        return {"q": q, "scale": scale}
    g = lay.group  # int4: w ≈ q·s + m per group, s and m rounded to fp16 before q is chosen
    grouped = w.view(s, n, k // g, g)
    lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    scale = ((hi - lo) / 15.0).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    minimum = lo.to(torch.float16)
    q = torch.round((grouped - minimum.float()[..., None]) / scale.float()[..., None])
    q = q.clamp_(0, 15).to(torch.uint8)
    half = g // 2
    packed = q[..., :half] | (q[..., half:] << 4)
    return {"q": packed.reshape(s, n, k // 2), "scale": scale, "minimum": minimum}


def quantize_rows(rows: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """Packed bf16 (or fp32) expert rows [S, 3·I·H] → compressed rows [S, row bytes] (uint8), on
    the rows' device. Padding bytes are zero, so equal weights give equal bytes."""
    h, i = fmt.hidden, fmt.inter
    s = rows.shape[0]
    w = rows.float()
    mats = {"gate_up": w[:, : 2 * i * h].reshape(s, 2 * i, h),
            "down": w[:, 2 * i * h:].reshape(s, h, i)}
    out = torch.zeros((s, fmt.row_bytes), dtype=torch.uint8, device=rows.device)
    for name, lay in (("gate_up", fmt.gate_up), ("down", fmt.down)):
        parts = _quantize_matrix(mats[name], fmt.name, lay)
        for key, p in (("q", lay.q), ("scale", lay.scale), ("minimum", lay.minimum)):
            if p is not None:
                _part(out, p).copy_(parts[key].view(s, *p.shape))
    return out


def dequantize_rows(rows: torch.Tensor, fmt: ExpertFormat,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Compressed rows [S, row bytes] → packed rows [S, 3·I·H] in `dtype` (tests, quality)."""
    gu, dn = views(rows, fmt)
    s = rows.shape[0]
    return torch.cat([gu.dequantize(dtype).reshape(s, -1), dn.dequantize(dtype).reshape(s, -1)],
                     dim=1)


def error_bound(w: torch.Tensor, fmt: ExpertFormat) -> torch.Tensor:
    """The largest error the quantization of packed rows `w` [S, 3·I·H] may make, per weight
    (the tests hold every format to it): half a step of its grid, plus rounding of the scales."""
    h, i = fmt.hidden, fmt.inter
    s = w.shape[0]
    w = w.float()
    out = []
    for lay, m in ((fmt.gate_up, w[:, : 2 * i * h].reshape(s, 2 * i, h)),
                   (fmt.down, w[:, 2 * i * h:].reshape(s, h, i))):
        if fmt.name == "int8":
            step = m.abs().amax(dim=-1, keepdim=True) / 127.0
            bound = step / 2 * (1 + 1e-5) + m.abs() * 2e-7
        elif fmt.name == "fp8":  # 3 mantissa bits: half an ulp is 1/16 of the value, or the
            b = lay.group  # subnormal spacing of the block's scale (2^-9 · s) at the bottom
            n, k = lay.n, lay.k
            pad = torch.zeros((s, -(-n // b) * b, -(-k // b) * b), device=m.device)
            pad[:, :n, :k] = m.abs()
            amax = pad.view(s, pad.shape[1] // b, b, pad.shape[2] // b, b).amax(dim=(2, 4))
            sc = (amax / FP8_MAX).repeat_interleave(b, 1).repeat_interleave(b, 2)[:, :n, :k]
            bound = torch.maximum(m.abs() / 16, sc * 2.0 ** -10) * (1 + 1e-5)
        else:
            g = lay.group
            grouped = m.reshape(s, lay.n, lay.k // g, g)
            lo, hi = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
            step = (hi - lo) / 15.0
            # half a step (fp16-rounded: 2^-11 relative), and the fp16 rounding of the minimum
            bound = step / 2 * (1 + 2.0 ** -10) + lo.abs() * 2.0 ** -11 + 1e-7
            bound = bound.expand_as(grouped).reshape(s, lay.n, lay.k)
        out.append(bound.reshape(s, -1))
    return torch.cat(out, dim=1)

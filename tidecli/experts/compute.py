"""Routed-expert arithmetic shared by every runtime.

Experts are stored packed: one row per expert of [gate (I·H) | up (I·H) | down (H·I)], so one
copy moves one expert. `pool_views` turns such a buffer into the two stacked matrices the
kernels read. Every path produces per-(token, slot k) outputs and sums them over k in a fixed
order, so a token's result does not depend on where each of its experts ran.

A compressed store's rows are bytes (experts/formats.py); their views are `QMatrix` stacks, which
every function here takes where it takes a stacked weight tensor: the grouped path runs the
dequantizing kernel (experts/qkernel.py), the reference dequantizes one expert, then multiplies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.experts.formats import ExpertFormat, is_compressed
from tidecli.experts.pairsort import pairsort_fits, sort_pairs, sort_pairs_reference
from tidecli.experts.quant import QMatrix, views

Weights = torch.Tensor | QMatrix  # a stack of experts' matrices [S, n, k]


def row_dtype(fmt: ExpertFormat | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype of expert rows on a device that computes in `dtype`: a compressed format's
    rows stay its bytes (uint8, dequantized by the kernel); bf16 rows take `dtype`."""
    return torch.uint8 if is_compressed(fmt) else dtype


def pool_views(buf: torch.Tensor, hidden: int, inter: int,
               fmt: ExpertFormat | None = None) -> tuple[Weights, Weights]:
    """buf [S, 3·I·H] → gate_up [S, 2I, H], down [S, H, I] (views, no copy); rows of a
    compressed format → the two QMatrix stacks."""
    if is_compressed(fmt):
        return views(buf, fmt)
    s = buf.shape[0]
    gate_up = buf[:, : 2 * inter * hidden].view(s, 2 * inter, hidden)
    down = buf[:, 2 * inter * hidden:].view(s, hidden, inter)
    return gate_up, down


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on a group of rows: down(silu(gate x) * up x). x [M, H] → [M, H]."""
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


def expert_weight(w: Weights, s: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert s's matrix [n, k]: a view, or the dequantized matrix in `dtype`."""
    if isinstance(w, QMatrix):
        return w.select(s).dequantize(dtype)[0]
    return w[s]


def run_grouped_loop(x: torch.Tensor, pair_slot: list[int] | torch.Tensor, gate_up: Weights,
                     down: Weights, k: int, out: torch.Tensor) -> None:
    """Reference grouping: for each slot with pairs, one expert_mlp over its tokens (ascending).

    pair_slot: slot per (token, k) pair, -1 to skip. Writes rows of `out` [T·k, H]; skipped rows
    are left alone. Used on the CPU and as the checked fallback on the GPU.
    """
    slots = pair_slot.tolist() if isinstance(pair_slot, torch.Tensor) else pair_slot
    groups: dict[int, list[int]] = {}
    for p, s in enumerate(slots):
        if s >= 0:
            groups.setdefault(s, []).append(p)
    for s, pairs in groups.items():
        idx = torch.tensor(pairs, device=x.device)
        out[idx] = expert_mlp(x[idx // k], expert_weight(gate_up, s, x.dtype),
                              expert_weight(down, s, x.dtype))


def pick_kernel(kernel: str, device: torch.device, dtype: torch.dtype,
                fmt: ExpertFormat | None = None) -> str:
    """"auto" → grouped_mm where it runs (Triton's expert pass, experts/qkernel.py: CUDA, bf16 on
    sm80+ or fp16, compressed or not; or torch._grouped_mm: sm90+, bf16), else the loop; other
    names pass."""
    if kernel == "auto":
        from tidecli.experts.qkernel import plain_rows_available, qkernel_available

        if is_compressed(fmt):
            return "grouped_mm" if qkernel_available(device, dtype, fmt.name) else "loop"
        if grouped_mm_available(device, dtype) or plain_rows_available(device, dtype):
            return "grouped_mm"
        return "loop"
    return kernel


def run_pairs(kernel: str, x: torch.Tensor, pair_slot: torch.Tensor, gate_up: Weights,
              down: Weights, k: int, *, streamed: bool = False) -> torch.Tensor:
    """Per-pair rows [T·k, H] of the slots' experts (zero rows where pair_slot is -1), with the
    grouped kernel or the reference loop. `streamed`: read in place from pinned host memory."""
    if kernel == "grouped_mm":
        return run_grouped_mm(x, pair_slot, gate_up, down, k, streamed=streamed)
    out = torch.zeros((pair_slot.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    run_grouped_loop(x, pair_slot, gate_up, down, k, out)
    return out


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 9


def grouped_linear(xs: torch.Tensor, w: Weights, offs: torch.Tensor, *,
                   streamed: bool = False) -> torch.Tensor:
    """xs [M, k] sorted by group, offs [G] the group ends → [M, n]: the rows of group g times
    w[g]ᵀ. torch._grouped_mm for bf16 on CUDA, the dequantizing kernel for compressed experts
    on CUDA (`streamed`: w is read in place from pinned host memory); elsewhere the reference
    loop (rows past the last group stay zero)."""
    if isinstance(w, QMatrix):
        if xs.is_cuda:
            from tidecli.experts.qkernel import quant_grouped_mm

            return quant_grouped_mm(xs, w, offs, streamed=streamed)
        return quant_grouped_reference(xs, w, offs)
    if xs.is_cuda:
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)
    return grouped_mm_reference(xs, w.transpose(-2, -1), offs)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs) spelled out (rows past the last group stay zero)."""
    out = torch.zeros((x.shape[0], w.shape[-1]), dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g].to(x.dtype)
        start = end
    return out


def quant_grouped_reference(x: torch.Tensor, w: QMatrix, offs: torch.Tensor) -> torch.Tensor:
    """The dequantizing grouped GEMM spelled out: per group, dequantize (fp32), multiply in
    fp32, round once to x's dtype."""
    out = torch.zeros((x.shape[0], w.layout.n), dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            wg = w.select(g).dequantize(torch.float32)[0]
            out[start:end] = (x[start:end].float() @ wg.T).to(x.dtype)
        start = end
    return out


def run_grouped_mm(x: torch.Tensor, pair_slot: torch.Tensor, gate_up: Weights,
                   down: Weights, k: int, *, streamed: bool = False) -> torch.Tensor:
    """All resident experts of a layer in two grouped GEMMs, without a host sync.

    pair_slot [T·k] (device, -1 = skip). Pairs are ordered by slot (stably: one kernel on a GPU,
    experts/pairsort.py; a stable argsort elsewhere, its reference). Returns [T·k, H] with zero
    rows for skipped pairs. `streamed`: the weights are read in place from pinned host memory.
    """
    s, p = gate_up.shape[0], pair_slot.numel()
    sort = sort_pairs if pairsort_fits(x.device, p, s) else sort_pairs_reference
    rows, dst, offs = sort(pair_slot, s, k)
    out = torch.zeros((p + 1, x.shape[1]), dtype=x.dtype, device=x.device)  # + a dummy row
    grouped_rows(x, rows, dst, offs, gate_up, down, out, streamed=streamed)
    return out[:p]


def grouped_rows(hidden: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor,
                 offs: torch.Tensor, gate_up: Weights, down: Weights,
                 out: torch.Tensor, *, streamed: bool = False) -> None:
    """Pairs sorted by group: out[dst[i]] = expert_g(hidden[rows[i]]) for the pairs in group g
    (offs: group ends); entries past the last group write at most the dummy row out[-1]. A row's
    result depends on its group's expert alone, whatever the other rows hold. `streamed`: the
    experts are read in place from pinned host memory. On CUDA the fused kernel takes the pass
    (qkernel.expert_rows: compressed experts, and plain ones unless qkernel.PLAIN is off), whose
    reference is `grouped_rows_ops`."""
    if hidden.is_cuda:
        from tidecli.experts.qkernel import expert_rows, plain_rows_available

        if isinstance(gate_up, QMatrix) or plain_rows_available(hidden.device, hidden.dtype):
            expert_rows(hidden, rows, dst, offs, gate_up, down, out, streamed=streamed)
            return
    grouped_rows_ops(hidden, rows, dst, offs, gate_up, down, out, streamed=streamed)


def grouped_rows_ops(hidden: torch.Tensor, rows: torch.Tensor, dst: torch.Tensor,
                     offs: torch.Tensor, gate_up: Weights, down: Weights,
                     out: torch.Tensor, *, streamed: bool = False) -> None:
    """`grouped_rows` as separate ops: gather the rows, two grouped GEMMs around SiLU·up,
    scatter the results (entries past the last group write the dummy row)."""
    xs = hidden.index_select(0, rows)
    h = grouped_linear(xs, gate_up, offs, streamed=streamed)
    g, u = h.chunk(2, dim=-1)
    y = grouped_linear(F.silu(g) * u, down, offs, streamed=streamed)
    out.index_copy_(0, dst, y.to(out.dtype))

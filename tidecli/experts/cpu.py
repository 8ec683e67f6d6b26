"""CPU workers: compute the (token, expert) pairs whose expert is not on the GPU.

The activations come to the host (small: T×H), the weights never move. Two ways to use the
cores, chosen by measurement (`tide profile` times both): `intra` runs the experts one after the
other with torch's intra-op threads; `experts` runs several experts at once, one thread each.
The compute dtype is either the stored bf16 (fast on CPUs with bf16 units) or fp32 (each expert
upcast per call); on a CPU-only device it follows the model dtype, which keeps the result bitwise
equal to the resident path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from tidecli.experts.compute import expert_mlp, expert_weight, pool_views
from tidecli.experts.formats import ExpertFormat


class CpuExperts:
    def __init__(self, *, hidden: int, inter: int, dtype: torch.dtype, threads: int,
                 mode: str = "intra", fmt: ExpertFormat | None = None) -> None:
        self.hidden = hidden
        self.format = fmt
        self.inter = inter
        self.dtype = dtype
        self.threads = max(1, threads)
        self.mode = mode
        self._pool = ThreadPoolExecutor(self.threads) if mode == "experts" and threads > 1 else None

    def _one(self, row: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = pool_views(row[None], self.hidden, self.inter, self.format)
        # compressed: dequantized (the reference), then multiplied
        gu, dn = expert_weight(gate_up, 0, self.dtype), expert_weight(down, 0, self.dtype)
        return expert_mlp(x.to(self.dtype), gu.to(self.dtype), dn.to(self.dtype))

    def run(self, jobs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """jobs: (packed expert row, x rows [M, H]) → outputs [M, H] in the compute dtype."""
        if self._pool is None:
            return [self._one(row, x) for row, x in jobs]
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(self._pool.map(lambda job: self._one(*job), jobs))
        finally:
            torch.set_num_threads(prev)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)

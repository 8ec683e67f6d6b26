"""A refresh's placement on the streamed runtime's device tables, in torch ops: the slow, plain
form of what experts/fused.py's planning kernel does in one launch (its tests compare the two
through the runtime's tokens and tables). Every shape is static, so it runs inside a CUDA graph.

Tables of one MoE layer: `table` [E+1] expert → slot (-1: not resident; entry E takes the writes
that place nothing), `owner` [bmax+1] slot → expert, `last` [bmax+1] slot → the forward that last
read it.
"""

from __future__ import annotations

import torch


def place_lru(table: torch.Tensor, owner: torch.Tensor, last: torch.Tensor, used: torch.Tensor,
              *, slots: int, bmax: int, keep: torch.Tensor, slot_ids: torch.Tensor,
              expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The used experts without a slot (`used` [E] bool) take the slots whose experts this step
    does not use, least recently used first (empty slots before any), at most as many as there
    are such slots, and none when `keep` (a device scalar, 0 or 1) is 0. The tables are updated
    in place. Returns how many were placed (a device scalar), the placed experts by slot rank
    ([slots], -1 past them) and the slots they go to in that order ([slots]): the rows to copy.
    `slot_ids` = arange(bmax), `expert_ids` = arange(E), kept by the caller."""
    b, e = slots, table.shape[0] - 1
    own = owner[:b]
    busy = (own >= 0) & used[own.clamp(min=0)]
    missing = used & (table[:e] < 0)
    pos = torch.cumsum(missing, 0) - 1  # rank of each missing expert, by id
    n_place = torch.minimum(missing.sum(), (~busy).sum()) * keep
    big = torch.iinfo(torch.long).max
    victims = torch.argsort(torch.where(busy, big, last[:b]), stable=True)  # [b]
    # the j-th missing expert (j < n_place) goes to victims[j]
    ranked = torch.full((bmax + 1,), -1, dtype=torch.long, device=used.device)
    ranked.index_put_((torch.where(missing & (pos < b), pos, bmax),), expert_ids)
    src = torch.where(slot_ids[:b] < n_place, ranked[:b], -1)
    take = src >= 0
    old = own[victims]
    table.index_put_((torch.where(take & (old >= 0), old, e),), torch.full_like(old, -1))
    table.index_put_((torch.where(take, src, e),), torch.where(take, victims, -1))
    owner.index_put_((torch.where(take, victims, bmax),), torch.where(take, src, -1))
    return n_place, src, victims

"""The LLaDA2 router: fp32 logits, sigmoid scores, bias for choosing only, group-limited top-k,
renormalised weights × routed_scaling_factor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.model.config import ModelConfig
from tidecli.model.weights import RouterWeights


def route(x: torch.Tensor, w: RouterWeights, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] → (expert ids [T, k] int64, weights [T, k] fp32)."""
    logits = F.linear(x.float(), w.weight.float())  # [T, E], fp32 whatever the stored dtype
    scores = logits.sigmoid()
    choice = scores + w.expert_bias if w.expert_bias is not None else scores
    t, e = choice.shape
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        grouped = choice.view(t, cfg.n_group, e // cfg.n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = group_score.topk(cfg.topk_group, dim=-1).indices  # [T, topk_group]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(t, e)
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=True).indices
    weights = scores.gather(1, ids)
    if cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * cfg.routed_scaling_factor

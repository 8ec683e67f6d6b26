"""The LLaDA2 router: fp32 logits, sigmoid scores, bias for choosing only, renormalised weights ×
routed_scaling_factor (once).

Expert choice, by config:
- group-limited top-k (2.0, 2.1): per token, the best `topk_group` of `n_group` groups (a group
  scores the sum of its top 2), then the top k inside them;
- block routing (2.2, `expert_capacity` > 0): the tokens are cut into routing windows of
  `block_size` aligned positions; a window admits the `expert_capacity` experts whose best
  score + bias over its tokens is highest (its pool), and each token takes its top k inside its
  window's pool. The groups are not applied.
Ties go to the lower expert id (a stable sort), in both: block routing's fast path and its
reference loop (`block_route_reference`) agree exactly, and so do the group-limited kernel on a
GPU (model/route_kernel.py) and its torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.model.config import ModelConfig
from tidecli.model.route_kernel import group_topk_kernel, kernel_fits
from tidecli.model.triton_util import triton_importable
from tidecli.model.weights import RouterWeights


def route(x: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
          offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] → (expert ids [T, k] int64, weights [T, k] fp32). `offset`: the first token's
    absolute position modulo the routing block (block routing only; the model's forward passes
    always start on a routing-block boundary: 0)."""
    scores = router_scores(x, w)
    ids = choose(scores, w, cfg, offset=offset)
    return ids, routing_weights(scores, ids, cfg)


def predict(x: torch.Tensor, w: RouterWeights, cfg: ModelConfig) -> torch.Tensor:
    """The expert ids [T, k] that router `w` would choose for x: the router's own choice, without
    the weights. Applied to an earlier layer's input it guesses a later layer's experts (read
    ahead, experts/stream.py); nothing computed depends on the guess."""
    return choose(router_scores(x, w), w, cfg)


def router_scores(x: torch.Tensor, w: RouterWeights) -> torch.Tensor:
    """[T, E] sigmoid scores, in fp32 whatever the stored dtype."""
    return F.linear(x.float(), w.weight.float()).sigmoid()


def choose(scores: torch.Tensor, w: RouterWeights, cfg: ModelConfig, *,
           offset: int = 0) -> torch.Tensor:
    """Sigmoid scores [T, E] → expert ids [T, k] (the bias shifts the choice, not the weights)."""
    choice = biased(scores, w)
    if cfg.block_routing:
        return block_choice(choice, capacity=cfg.expert_capacity, window=cfg.block_size,
                            k=cfg.num_experts_per_tok, offset=offset)
    return group_choice(choice, cfg)


def biased(scores: torch.Tensor, w: RouterWeights) -> torch.Tensor:
    """What the experts are chosen by: the scores plus the router's bias, when it has one."""
    return scores + w.expert_bias if w.expert_bias is not None else scores


def routing_weights(scores: torch.Tensor, ids: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The unbiased sigmoid scores of the chosen experts, normalised, × routed_scaling_factor."""
    weights = scores.gather(1, ids)
    if cfg.num_experts_per_tok > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def group_choice(choice: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Group-limited top-k: one kernel per forward on a GPU (model/route_kernel.py), its torch
    reference elsewhere. Both break ties to the lower index."""
    grouped = cfg.n_group > 1 and cfg.topk_group < cfg.n_group
    n_group, topk_group = (cfg.n_group, cfg.topk_group) if grouped else (1, 1)
    if choice.is_cuda:
        return torch.ops.tide.group_topk(choice, n_group, topk_group, cfg.num_experts_per_tok)
    return group_topk_reference(choice, n_group, topk_group, cfg.num_experts_per_tok)


def group_topk_reference(choice: torch.Tensor, n_group: int, topk_group: int,
                         k: int) -> torch.Tensor:
    """choice [T, E] → ids [T, k]: each group scores the sum of its top 2, the best
    `topk_group` groups stay, then the best k of their experts, best first."""
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.view(t, n_group, e // n_group)
        group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = _top(group_score, topk_group)  # [T, topk_group]
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(t, e)
    return _top(choice, k)


@torch.library.custom_op("tide::group_topk", mutates_args=())
def _group_topk(choice: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    if choice.is_cuda and kernel_fits(choice.shape[1], n_group) and triton_importable():
        return group_topk_kernel(choice, n_group, topk_group, k)
    return group_topk_reference(choice, n_group, topk_group, k)


@_group_topk.register_fake
def _(choice, n_group, topk_group, k):
    return choice.new_empty((choice.shape[0], k), dtype=torch.long)


def _top(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest along the last dim, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :n]


def block_choice(choice: torch.Tensor, *, capacity: int, window: int, k: int,
                 offset: int = 0) -> torch.Tensor:
    """choice [T, E] (score + bias) → ids [T, k], every token inside its routing window's pool.
    Static shapes for a given T (the captured step program routes through it)."""
    t, e = choice.shape
    cap = min(capacity, e)
    pad_front = offset % window
    n_win = -(-(pad_front + t) // window)
    pad_back = n_win * window - pad_front - t
    padded = F.pad(choice, (0, 0, pad_front, pad_back), value=float("-inf")) \
        if pad_front or pad_back else choice
    best = padded.view(n_win, window, e).amax(dim=1)  # [W, E] a window's admission scores
    pool = _top(best, cap)  # [W, cap]
    allowed = torch.zeros((n_win, e), dtype=torch.bool, device=choice.device)
    allowed.scatter_(1, pool, True)
    win = (torch.arange(t, device=choice.device) + pad_front) // window  # [T]
    inside = choice.masked_fill(~allowed[win], float("-inf"))
    return _top(inside, k)


def block_route_reference(scores: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig, *,
                          offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow and obvious block routing from sigmoid scores [T, E]: a loop over the windows and
    their tokens, plain Python sorting; the fast path is tested against it."""
    t, e = scores.shape
    r = scores + bias if bias is not None else scores
    rows = r.tolist()
    ids: list[list[int]] = []
    start = 0
    while start < t:
        stop = min(t, start + cfg.block_size - (offset + start) % cfg.block_size)
        members = range(start, stop)
        score = [max(rows[i][j] for i in members) for j in range(e)]
        pool = sorted(range(e), key=lambda j: (-score[j], j))[: cfg.expert_capacity]
        for i in members:
            ids.append(sorted(pool, key=lambda j: (-rows[i][j], j))[: cfg.num_experts_per_tok])
        start = stop
    out = torch.tensor(ids, dtype=torch.long).reshape(t, cfg.num_experts_per_tok)
    weights = []
    for i in range(t):
        chosen = [float(scores[i, j]) for j in out[i].tolist()]  # the bias never weighs
        denom = sum(chosen) + 1e-20 if len(chosen) > 1 else 1.0
        weights.append([c / denom * cfg.routed_scaling_factor for c in chosen])
    return out, torch.tensor(weights, dtype=torch.float32)

"""Token choice and confidence from fp32 logits: greedy at temperature 0, else sampled."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def choose(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] fp32 → (tokens [N], confidence [N] = probability of the chosen token)."""
    if temperature <= 0:
        probs = logits.softmax(dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)

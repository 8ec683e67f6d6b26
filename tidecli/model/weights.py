"""Plain containers for the weights the forward pass reads (everything but routed experts).

Filled by `checkpoint.load_dense`; the forward pass never sees tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [(nh + 2·nkv)·hd, H]  rows: all Q heads, then K heads, then V heads
    dense: torch.Tensor  # [H, nh·hd]  output projection
    q_norm: torch.Tensor | None  # [hd]
    k_norm: torch.Tensor | None  # [hd]


@dataclass
class FFNWeights:
    gate_up: torch.Tensor  # [2·I, H]  gate rows then up rows (fused: one GEMM instead of two)
    down: torch.Tensor  # [H, I]


@dataclass
class RouterWeights:
    weight: torch.Tensor  # [E, H]  in the router dtype (fp32 for LLaDA2)
    expert_bias: torch.Tensor | None  # [E] fp32, used for choosing only


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    attn: AttentionWeights
    dense_ffn: FFNWeights | None = None  # layers < first_k_dense_replace
    router: RouterWeights | None = None  # MoE layers
    shared: FFNWeights | None = None  # MoE layers with shared experts


@dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, H]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]
    layers: list[LayerWeights] = field(default_factory=list)

    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0

        def add(t: torch.Tensor | None) -> None:
            nonlocal total
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()

        add(self.embed)
        add(self.norm)
        add(self.lm_head)
        for lw in self.layers:
            for t in (lw.input_norm, lw.post_norm, lw.attn.qkv, lw.attn.dense, lw.attn.q_norm,
                      lw.attn.k_norm):
                add(t)
            for ffn in (lw.dense_ffn, lw.shared):
                if ffn is not None:
                    add(ffn.gate_up)
                    add(ffn.down)
            if lw.router is not None:
                add(lw.router.weight)
                add(lw.router.expert_bias)
        return total

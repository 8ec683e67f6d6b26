"""Load everything but the routed experts into `DenseWeights` on a device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tidecli.model import checkpoint as ck
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import ShardReader, check_finite
from tidecli.model.weights import (
    AttentionWeights,
    DenseWeights,
    FFNWeights,
    LayerWeights,
    RouterWeights,
)


def load_dense(
    ckpt: Checkpoint,
    *,
    device: torch.device,
    dtype: torch.dtype,
    embed_device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> DenseWeights:
    """Read every non-expert tensor, check it is finite, and place it.

    The router weight and expert bias are kept in fp32: the reference computes routing in fp32
    whatever the stored dtype, so routing never changes with the activation dtype. The
    embedding table may live on another device (the host): a step reads only a few rows.
    """
    cfg = ckpt.config
    embed_device = embed_device or device

    with ShardReader() as reader:

        def get(name: str, *, to: torch.device = device, as_dtype: torch.dtype | None = dtype):
            info = ckpt.tensors[name]
            t = reader.read(info)
            check_finite(name, t, shard=info.file.name)
            if progress:
                progress(info.nbytes)
            return t.to(device=to, dtype=as_dtype or t.dtype)

        def ffn(names: dict[str, str], prefix: str) -> FFNWeights:
            gate = get(names[f"{prefix}.gate_proj"])
            up = get(names[f"{prefix}.up_proj"])
            return FFNWeights(gate_up=torch.cat([gate, up], 0),
                              down=get(names[f"{prefix}.down_proj"]))

        embed = get(ck.EMBED, to=embed_device)
        lm_head = embed.to(device) if cfg.tie_word_embeddings else get(ck.LM_HEAD)
        weights = DenseWeights(embed=embed, norm=get(ck.FINAL_NORM), lm_head=lm_head)
        for i in range(cfg.num_hidden_layers):
            names = ck.layer_tensor_names(cfg, i)
            attn = AttentionWeights(
                qkv=get(names["qkv"]),
                dense=get(names["dense"]),
                q_norm=get(names["q_norm"]) if "q_norm" in names else None,
                k_norm=get(names["k_norm"]) if "k_norm" in names else None,
            )
            lw = LayerWeights(input_norm=get(names["input_norm"]),
                              post_norm=get(names["post_norm"]), attn=attn)
            if "ffn.gate_proj" in names:
                lw.dense_ffn = ffn(names, "ffn")
            else:
                bias = get(names["router_bias"], as_dtype=torch.float32) \
                    if "router_bias" in names else None
                lw.router = RouterWeights(weight=get(names["router"], as_dtype=torch.float32),
                                          expert_bias=bias)
                if "shared.gate_proj" in names:
                    lw.shared = ffn(names, "shared")
            weights.layers.append(lw)
    return weights


def dense_bytes(ckpt: Checkpoint) -> int:
    """Bytes of every non-expert tensor as stored."""
    return sum(ckpt.tensors[n].nbytes for n in ck.dense_tensor_shapes(ckpt.config))

"""The LLaDA2 building blocks as plain functions: RMSNorm, partial RoPE, attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.model.weights import AttentionWeights, FFNWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back to the input dtype, then scale (the reference's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """cos/sin tables for partial RoPE, built in fp32 from absolute positions."""

    def __init__(self, rotary_dim: int, theta: float, max_positions: int, device: torch.device):
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                                 device=device) / rotary_dim))
        pos = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, inv_freq)  # [P, rot/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, rot]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, hd]. Rotates the first `rotary_dim` dims ("rotate half" pairing d with
        d + rot/2); the rest pass through untouched."""
        rot = self.rotary_dim
        cos = self.cos[positions].to(x.dtype)[:, None, :]  # [T, 1, rot]
        sin = self.sin[positions].to(x.dtype)[:, None, :]
        xr, xp = x[..., :rot], x[..., rot:]
        half = rot // 2
        rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
        return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block: int) -> torch.Tensor:
    """True where a query may attend: key block ≤ query block (bidirectional inside a block)."""
    return (k_pos[None, :] // block) <= (q_pos[:, None] // block)


def attention(
    x: torch.Tensor,  # [T, H] normed input
    w: AttentionWeights,
    *,
    positions: torch.Tensor,  # [T] absolute positions
    rotary: Rotary,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    kv: tuple[torch.Tensor, torch.Tensor] | None,  # cache [S, nkv, hd] ×2 or None
    kv_start: int | None,  # position of x[0]: K/V written at kv_start..kv_start+T, keys up to
    # there; None (the captured step): written at `positions`, keys = the whole cache + `mask`
    mask: torch.Tensor | None,  # [T, S] bool or None (= attend to every key)
) -> torch.Tensor:
    t = x.shape[0]
    qkv = F.linear(x, w.qkv)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim,
                         num_kv_heads * head_dim], dim=-1)
    q = q.view(t, num_heads, head_dim)
    k = k.view(t, num_kv_heads, head_dim)
    v = v.view(t, num_kv_heads, head_dim)
    if w.q_norm is not None:  # QK-norm over head_dim comes before RoPE
        q = rms_norm(q, w.q_norm, eps)
        k = rms_norm(k, w.k_norm, eps)
    q = rotary.apply(q, positions)
    k = rotary.apply(k, positions)
    if kv is not None:
        cache_k, cache_v = kv
        if kv_start is None:  # static shapes for graph capture: positions live on the device
            cache_k.index_copy_(0, positions, k)
            cache_v.index_copy_(0, positions, v)
            k, v = cache_k, cache_v
        else:
            end = kv_start + t
            cache_k[kv_start:end] = k
            cache_v[kv_start:end] = v
            k, v = cache_k[:end], cache_v[:end]
    # SDPA wants [B, heads, T, hd]; GQA handled by the kernel, softmax accumulates in fp32.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=num_heads != num_kv_heads,
    )
    out = out[0].transpose(0, 1).reshape(t, num_heads * head_dim)
    return F.linear(out, w.dense)


def swiglu(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    gate, up = F.linear(x, w.gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w.down)

"""The LLaDA2 building blocks as plain functions: RMSNorm, partial RoPE, attention, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.model.weights import FFNWeights


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

    def tables(self, positions: torch.Tensor, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, rot] of `positions` in `dtype`: one pair serves q and k of every
        layer of a forward pass."""
        return (self.cos[positions].to(dtype)[:, None, :],
                self.sin[positions].to(dtype)[:, None, :])

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rotate(x, *self.tables(positions, x.dtype))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]. Rotates the first `rot` dims of each head (cos/sin [T, 1, rot],
    "rotate half" pairing d with d + rot/2); the rest pass through untouched."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block: int) -> torch.Tensor:
    """True where a query may attend: key block ≤ query block (bidirectional inside a block)."""
    return (k_pos[None, :] // block) <= (q_pos[:, None] // block)


def attention_in(x: torch.Tensor, norm: torch.Tensor, qkv: torch.Tensor,
                 q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor, *, eps: float, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-norm, the fused QKV projection, QK-norm (over head_dim, before RoPE) and RoPE:
    x [T, H] → q [T, nh, hd], k and v [T, nkv, hd]. Pure (tensors in, tensors out): the step
    program may run it compiled."""
    t = x.shape[0]
    q, k, v = F.linear(rms_norm(x, norm, eps), qkv).split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.view(t, num_heads, head_dim)
    k = k.view(t, num_kv_heads, head_dim)
    v = v.view(t, num_kv_heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    positions: torch.Tensor,  # [T] absolute positions
    kv: tuple[torch.Tensor, torch.Tensor] | None,  # cache [S, nkv, hd] ×2 or None
    kv_start: int | None,  # position of q[0]: K/V written at kv_start..kv_start+T, keys up to
    # there; None (the captured step): written at `positions`, keys = the whole cache + `mask`
    mask: torch.Tensor | None,  # [T, S] bool or None (= attend to every key)
) -> torch.Tensor:
    """Write this pass's K/V into the cache and attend: → [T, nh·hd]."""
    t, num_heads, head_dim = q.shape
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
        attn_mask=mask, enable_gqa=num_heads != k.shape[1],
    )
    return out[0].transpose(0, 1).reshape(t, num_heads * head_dim)


def attention_out(x: torch.Tensor, out: torch.Tensor, dense: torch.Tensor, norm: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The output projection and the residual, then the FFN's pre-norm: (h, normed h). Pure."""
    h = x + F.linear(out, dense)
    return h, rms_norm(h, norm, eps)


def swiglu(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    return ffn(x, w.gate_up, w.down)


def ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SwiGLU with the gate and up projections fused in one GEMM. Pure."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)

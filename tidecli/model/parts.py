"""The pure device functions a layer is made of, as one set: eager, or the same functions
through torch.compile (`--compile on`).

A captured step is bound by the number of small kernels it launches (norms, RoPE, casts,
routing arithmetic, residual adds), not by bandwidth: a resident step of full-size mini ran
2,223 kernels eager and 1,291 compiled (docs/benchmarks.md, section 13). Compiled, each function
here becomes a few fused Triton kernels around the same cuBLAS GEMMs, traced once per shape: the
step program's shapes never change, and every layer has the same ones, so one compile serves
every layer and every later step. Only the step program uses the compiled set; prefill and the
reference path stay eager (their lengths vary).

Fused arithmetic rounds differently from eager (bf16 products kept in fp32 inside a kernel), so a
compiled step's logits differ from an eager step's in the last bits. Every expert policy runs the
same compiled functions, so each still gives exactly the tokens of the all-resident run compiled
the same way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tidecli.model.layers import attention_in, attention_out, ffn
from tidecli.model.router import route


def residual(h: torch.Tensor, y: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
    """A MoE layer's output: h + routed experts (+ the shared expert, ungated)."""
    return h + (y if shared is None else y + shared)


def combine(pair_out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """pair_out [T·k, H] (expert outputs), weights [T, k] fp32 → [T, H] in `dtype`.

    fp32 weighting and a sum over k in slot order, as the reference does: a token's result does
    not depend on where each of its experts ran.
    """
    t, k = weights.shape
    out = pair_out.view(t, k, -1).float() * weights[..., None]
    return out.sum(dim=1).to(dtype)


def moe_out(h: torch.Tensor, pair_out: torch.Tensor, weights: torch.Tensor,
            shared: torch.Tensor | None) -> torch.Tensor:
    """A MoE layer's output from its per-pair expert rows: `residual` of their `combine`."""
    return residual(h, combine(pair_out, weights, pair_out.dtype), shared)


@dataclass(frozen=True)
class LayerFns:
    """The functions a forward pass calls for each part of a layer (see layers.py, router.py)."""

    name: str  # "eager" | "compiled"
    attention_in: Callable
    attention_out: Callable
    ffn: Callable
    route: Callable  # the model's own routing (a replaced router runs as written)
    residual: Callable
    moe_out: Callable  # combine + residual (the step program; runtimes give per-pair rows)


EAGER = LayerFns("eager", attention_in, attention_out, ffn, route, residual, moe_out)


def compiled(backend: str = "inductor") -> LayerFns:
    """The same functions through torch.compile: static shapes, whole graphs (a function that
    cannot be traced whole fails at its first call instead of running in pieces).

    Inductor compiles in this process, not in its pool of worker processes: on an H200 host
    (16 cores) the first engine of a process that had started the pool ran its steps at 19-24
    ms instead of 6.6-7.1 (the GPU's share unchanged at 6 ms), and compiling in-process removed
    that (docs/benchmarks.md). TORCHINDUCTOR_COMPILE_THREADS, when set, still decides."""
    if backend == "inductor" and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor

        inductor.compile_threads = 1
    # Inductor suggests TF32 for fp32 matmuls on every compile; TF32 would change the step's
    # fp32 arithmetic, so it stays off and the advice is not shown to the user
    warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores for float32")

    def c(fn: Callable) -> Callable:
        return torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)

    return LayerFns("compiled", c(attention_in), c(attention_out), c(ffn), c(route),
                    c(residual), c(moe_out))


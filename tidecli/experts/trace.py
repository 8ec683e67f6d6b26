"""Routing traces: per forward pass and MoE layer, how many tokens each expert received.

Saved as a compact .npz (`counts` [F, L, E] uint16 plus the decoder position of every forward)
for the planner (drift and miss-growth estimates) and the benchmarks (oracle bounds).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tidecli.errors import TideError
from tidecli.fsutil import atomic_write_bytes

KINDS = ("prefill", "step", "commit", "reference")


@dataclass
class RoutingTrace:
    num_layers: int  # MoE layers
    num_experts: int
    moe_layers: list[int]  # model layer index of each traced layer
    counts: list[np.ndarray] = field(default_factory=list)  # each [L, E]
    kinds: list[str] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def append(self, counts: np.ndarray, *, kind: str, block: int, step: int, tokens: int) -> None:
        self.counts.append(np.asarray(counts, dtype=np.uint16).reshape(self.num_layers,
                                                                       self.num_experts))
        self.kinds.append(kind)
        self.blocks.append(block)
        self.steps.append(step)
        self.tokens.append(tokens)

    def __len__(self) -> int:
        return len(self.counts)

    def array(self) -> np.ndarray:
        if not self.counts:
            return np.zeros((0, self.num_layers, self.num_experts), dtype=np.uint16)
        return np.stack(self.counts)

    def steps_only(self) -> RoutingTrace:
        """The denoising steps (what residency policies are judged on), in order."""
        out = RoutingTrace(self.num_layers, self.num_experts, list(self.moe_layers),
                           meta=dict(self.meta))
        for c, k, b, s, t in zip(self.counts, self.kinds, self.blocks, self.steps, self.tokens,
                                 strict=True):
            if k == "step":
                out.append(c, kind=k, block=b, step=s, tokens=t)
        return out

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, counts=self.array(), kinds=np.array([KINDS.index(k) for k in self.kinds],
                                                     dtype=np.uint8),
            blocks=np.array(self.blocks, dtype=np.int32),
            steps=np.array(self.steps, dtype=np.int32),
            tokens=np.array(self.tokens, dtype=np.int32), moe_layers=np.array(self.moe_layers,
                                                                              dtype=np.int32),
            meta=np.array(json.dumps(self.meta)))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        try:
            with np.load(path, allow_pickle=False) as z:
                counts = z["counts"]
                tr = cls(int(counts.shape[1]), int(counts.shape[2]),
                         [int(x) for x in z["moe_layers"]], meta=json.loads(str(z["meta"])))
                for i in range(counts.shape[0]):
                    tr.append(counts[i], kind=KINDS[int(z["kinds"][i])], block=int(z["blocks"][i]),
                              step=int(z["steps"][i]), tokens=int(z["tokens"][i]))
        except (OSError, KeyError, ValueError, IndexError) as exc:
            raise TideError(f"cannot read routing trace {path}: {exc}",
                            "record a new one with `tide generate --trace FILE`") from exc
        return tr

"""How far a compressed format of the routed experts moves the model's numbers from bf16's (the
quality columns of `tide bench --experts-dtype bf16,int8,...`):

- logits: on the same inputs (each prompt followed by the bf16 run's reply, its last block
  masked again, as a denoising step sees it), the mean KL divergence KL(bf16 ‖ format) of the
  next-token distributions at the masked positions, and how often their top-1 tokens agree;
- expert outputs: the relative error ‖y_format − y_bf16‖ / ‖y_bf16‖ of a sample of experts on
  random inputs (the format's own error, computed with the reference dequantization in fp32).

On synthetic checkpoints the weights are random, not a trained model's: these are numerical
figures of the formats on those weights, not a measure of accuracy on any task.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidecli.bench.oracle import agreement
from tidecli.experts.compute import expert_mlp, pool_views
from tidecli.experts.formats import ExpertFormat, expert_format
from tidecli.experts.quant import dequantize_rows, quantize_rows
from tidecli.experts.runtime import read_expert_packed
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.moe import ForwardInfo, Router
from tidecli.model.tensorio import ShardReader, torch_dtype


def probe_inputs(prompts: list[list[int]], replies: list[list[int]], *, block: int,
                 mask_id: int) -> list[tuple[list[int], list[int]]]:
    """(ids, positions to read): prompt + reply with the reply's last block (at most `block`
    tokens) masked again; the masked positions are the ones compared."""
    out = []
    for prompt, reply in zip(prompts, replies, strict=True):
        if not reply:
            continue
        n = min(block, len(reply))
        ids = list(prompt) + list(reply[:-n]) + [mask_id] * n
        out.append((ids, list(range(len(ids) - n, len(ids)))))
    return out


def probe_logits(engine, inputs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """fp32 logits [rows, vocab] (on the CPU) of each input, with the engine's current expert
    runtime and the model's own routing (the slow reference forward: the whole window)."""
    model = engine.model
    router, model.router = model.router, Router()
    try:
        out = []
        for ids, rows in inputs:
            t = torch.tensor(ids, dtype=torch.long, device=engine.device)
            r = torch.tensor(rows, dtype=torch.long, device=engine.device)
            out.append(model.reference_logits(t, r, ForwardInfo("prefill")).float().cpu())
        return out
    finally:
        model.router = router


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    """Mean KL(ref ‖ got) per position (nats) and the share of positions whose argmax agrees."""
    kl_sum, same, n = 0.0, 0, 0
    for a, b in zip(ref, got, strict=True):
        la, lb = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
        kl = (la.exp() * (la - lb)).sum(dim=-1).clamp_min(0)
        kl_sum += float(kl.sum())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    return {"logits_kl": kl_sum / n if n else 0.0, "logits_top1": same / n if n else 1.0}


def expert_error(ckpt: Checkpoint, fmt: ExpertFormat, *, per_layer: int = 4, tokens: int = 32,
                 seed: int = 0) -> float:
    """Relative error of the outputs of `per_layer` experts of every MoE layer (spread over the
    ids), on random unit-scale inputs, fp32 throughout."""
    cfg = ckpt.config
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, h, generator=g)
    step = max(1, cfg.num_experts // per_layer)
    experts = list(range(0, cfg.num_experts, step))[:per_layer]
    rows = torch.empty((len(experts), cfg.expert_params), dtype=torch_dtype(ckpt.expert_dtype()))
    num = den = 0.0
    with ShardReader() as reader:
        for layer in cfg.moe_layers:
            for j, e in enumerate(experts):
                read_expert_packed(reader, ckpt, layer, e, rows[j])
            exact = rows.float()
            approx = dequantize_rows(quantize_rows(rows, fmt), fmt) if fmt.compressed else exact
            gu, dn = pool_views(exact, h, i)
            qgu, qdn = pool_views(approx, h, i)
            for j in range(len(experts)):
                y = expert_mlp(x, gu[j], dn[j])
                num += float((expert_mlp(x, qgu[j], qdn[j]) - y).pow(2).sum())
                den += float(y.pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def stored_expert_bytes(engine, fmt: str) -> int:
    """One expert as stored and copied: the checkpoint's bytes, or the format's."""
    from tidecli.runtime.build import experts_format
    from tidecli.runtime.facts import routed_bytes

    cfg = engine.cfg
    return routed_bytes(engine.ckpt, experts_format(engine.ckpt, fmt)) // \
        (cfg.num_moe_layers * cfg.num_experts)


class FormatComparison:
    """The bench's formats against bf16: per workload bf16's first run's tokens, bf16's probe
    inputs and logits, and per format its figures (`figures`), measured at its first run."""

    def __init__(self, prompt_ids: list[list[int]]) -> None:
        self.prompt_ids = prompt_ids
        self.bf16_outputs: dict[str, list[list[int]]] = {}
        self.figures: dict[str, dict] = {}
        self._probe: tuple[list, list] | None = None

    def run_fields(self, engine, fmt: str, workload: str, outputs: list[list[int]]) -> dict:
        """What a run's row gains: its format and its tokens' agreement with bf16's."""
        if fmt == "bf16":
            self.bf16_outputs.setdefault(workload, outputs)
        ref = self.bf16_outputs.get(workload)
        if fmt not in self.figures:
            self.figures[fmt] = self._measure(engine, fmt, outputs)
        return {"experts_dtype": fmt,
                "token_agreement_bf16": round(agreement(outputs, ref), 4)
                if ref is not None else None}

    def _measure(self, engine, fmt: str, outputs: list[list[int]]) -> dict:
        """The format's logits on bf16's probe inputs against bf16's (bf16's own first run sets
        them; it runs first), and its experts' relative error; with the current runtime."""
        cfg = engine.cfg
        layout = expert_format(fmt, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)
        eb = stored_expert_bytes(engine, fmt)
        out = {"label": layout.label(), "expert_bytes": eb,
               "routed_expert_bytes": eb * cfg.num_experts * cfg.num_moe_layers,
               "ratio": round(layout.ratio, 3),
               "expert_rel_error": round(expert_error(engine.ckpt, layout), 6)}
        if fmt == "bf16":
            inputs = probe_inputs(self.prompt_ids, outputs[: len(self.prompt_ids)],
                                  block=engine.opts.workload.block_length,
                                  mask_id=engine.tokenizer.ids.mask)
            self._probe = (inputs, probe_logits(engine, inputs))
        if self._probe is not None:
            got = probe_logits(engine, self._probe[0])
            out.update({k: round(v, 6) for k, v in compare_logits(self._probe[1], got).items()})
        return out

"""Synthetic LLaDA2 checkpoints in the exact published format, with random weights.

`config.json` with the real field names, sharded safetensors with `model.safetensors.index.json`,
and the tokenizer files with the LLaDA2 special tokens at their real ids. Weights are random
(normal, std `initializer_range`, norms at 1) in bf16; the expert bias is fp32. Each tensor is
drawn from its own generator seeded by (seed, name), so the weights do not depend on sharding.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tidecli.errors import TideError
from tidecli.fsutil import atomic_dir
from tidecli.model import checkpoint as ck
from tidecli.model.config import ModelConfig, config_from_dict
from tidecli.model.presets import preset_config, stop_ids
from tidecli.model.safetensors_writer import write_shard
from tidecli.model.synth_tokenizer import write_tokenizer_files

DEFAULT_SHARD_BYTES = {"tiny": 16 << 20, "tiny22": 16 << 20, "mini": 4 << 30, "flash": 4 << 30}
# lm_head sharpness per preset, chosen so threshold-0.95 decoding commits a few tokens per step
# as trained models do (random weights give flat logits: one token per step); how: the script
# tools/bench/logit_scale.py, figures in docs/benchmarks.md.
DEFAULT_LOGIT_SCALE: dict[str, float] = {"tiny": 130.0, "tiny22": 130.0, "mini": 14.0,
                                          "flash": 14.0, "flash22": 14.0}


@dataclass(frozen=True)
class SynthPlan:
    config: ModelConfig
    raw_config: dict
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    shards: list[list[int]]  # entry indices per shard
    total_bytes: int


def _ordered_entries(cfg: ModelConfig) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """All tensors in checkpoint order: embedding, layer by layer, final norm, lm_head."""
    dense = ck.dense_tensor_shapes(cfg)
    entries = [(ck.EMBED, torch.bfloat16, dense[ck.EMBED])]
    for i in range(cfg.num_hidden_layers):
        prefix = ck.layer_prefix(i) + "."
        for name, shape in dense.items():
            if name.startswith(prefix):
                dtype = torch.float32 if name.endswith("expert_bias") else torch.bfloat16
                entries.append((name, dtype, shape))
        if i in cfg.moe_layers:
            for e in range(cfg.num_experts):
                for name, shape in zip(ck.expert_tensor_names(i, e), ck.expert_shapes(cfg),
                                       strict=True):
                    entries.append((name, torch.bfloat16, shape))
    entries.append((ck.FINAL_NORM, torch.bfloat16, dense[ck.FINAL_NORM]))
    if ck.LM_HEAD in dense:
        entries.append((ck.LM_HEAD, torch.bfloat16, dense[ck.LM_HEAD]))
    return entries


def plan(preset: str, *, layers: int | None = None, overrides: dict | None = None,
         shard_bytes: int | None = None) -> SynthPlan:
    raw = preset_config(preset, layers=layers, overrides=overrides)
    cfg = config_from_dict(raw)
    entries = _ordered_entries(cfg)
    limit = shard_bytes or DEFAULT_SHARD_BYTES.get(preset, 4 << 30)
    shards: list[list[int]] = [[]]
    size = 0
    total = 0
    for idx, (_, dtype, shape) in enumerate(entries):
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(idx)
        size += n
        total += n
    return SynthPlan(cfg, raw, entries, shards, total)


# The lm_head rows of LLaDA2.2's edit tokens are this much larger, so that random weights choose
# DELETE and SPLIT now and then (a few positions in a hundred) and Levenshtein decoding edits;
# the rate is this tool's choice, not the trained model's.
EDIT_ROW_SCALE = 2.5


def _tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], *, seed: int, std: float,
            device: torch.device, logit_scale: float = 1.0,
            edit_ids: tuple[int, int] | None = None) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    scale = std * 0.5 if name.endswith("expert_bias") else std
    if name == ck.LM_HEAD:
        scale *= logit_scale
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
    if name == ck.LM_HEAD and edit_ids:
        t[list(edit_ids)] *= EDIT_ROW_SCALE
    return t.to(dtype)


def write_checkpoint(out: str | Path, *, preset: str = "tiny", layers: int | None = None,
                     seed: int = 0, force: bool = False, overrides: dict | None = None,
                     shard_bytes: int | None = None, device: str = "auto",
                     logit_scale: float | None = None, config_only: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete checkpoint into `out` (atomically). progress(done_bytes, total_bytes).
    `config_only`: the config, generation config and tokenizer files without any weight (what
    `tide plan` reads).

    `logit_scale` multiplies the lm_head's std: random weights otherwise give nearly flat
    next-token distributions, so every step would commit one token through the quota fallback;
    a sharper head lets several positions pass the threshold per step, as trained models do.
    """
    if logit_scale is None:
        logit_scale = DEFAULT_LOGIT_SCALE.get(preset, 1.0)
    p = plan(preset, layers=layers, overrides=overrides, shard_bytes=shard_bytes)
    if config_only:
        p = SynthPlan(p.config, p.raw_config, [], [], 0)
    out = Path(out)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    existing = next(d for d in (out.absolute(), *out.absolute().parents) if d.exists())
    free = shutil.disk_usage(existing).free
    if free < p.total_bytes + (64 << 20):
        raise TideError(
            f"not enough disk space for a {p.total_bytes / 2**30:.2f} GiB checkpoint in "
            f"{out.parent} ({free / 2**30:.2f} GiB free)",
            "free some space or choose another folder (use --layers to write fewer layers)")
    std = float(p.raw_config.get("initializer_range", 0.02))
    done = 0
    if progress:
        progress(0, p.total_bytes)

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, p.total_bytes)

    with atomic_dir(out, force=force) as tmp:
        n_shards = len(p.shards)
        weight_map: dict[str, str] = {}
        for s, idxs in enumerate(p.shards):
            fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
            entries = [p.entries[i] for i in idxs]
            tensors = (_tensor(n, d, sh, seed=seed, std=std, device=dev, logit_scale=logit_scale,
                               edit_ids=p.config.edit_token_ids) for n, d, sh in entries)
            write_shard(tmp / fname, entries, tensors, progress=tick)
            for name, _, _ in entries:
                weight_map[name] = fname
        index = {"metadata": {"total_size": p.total_bytes}, "weight_map": weight_map}
        if not config_only:
            (tmp / ck.INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(p.raw_config, indent=2), encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, "eos_token_id": stop_ids(p.raw_config),
             "pad_token_id": 156892}, indent=2), encoding="utf-8")
        write_tokenizer_files(tmp, edit_ids=p.config.edit_token_ids)
        (tmp / "SYNTHETIC.md").write_text(
            f"Synthetic LLaDA2 checkpoint written by `tide synth` (preset {preset}, seed {seed}, "
            f"layers {p.config.num_hidden_layers}).\n" + (
                "Config and tokenizer only, no weights: for `tide plan`.\n" if config_only else
                "Random weights: the text it generates is meaningless. The format matches the "
                "published checkpoints.\n"), encoding="utf-8")
    return out

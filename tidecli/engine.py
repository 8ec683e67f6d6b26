"""Puts the pieces together: checkpoint → dense weights + expert runtime + model + tokenizer.

Commands build one `Engine` and ask it for generations; the engine never prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings
from tidecli.errors import TideError
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.llada2 import LLaDA2Model
from tidecli.model.loader import dense_bytes, load_dense
from tidecli.model.resolve import resolve_model
from tidecli.model.tokenizer import ChatTokenizer

# progress(stage, done_bytes, total_bytes)
LoadProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EngineOptions:
    model: str | None = None
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    policy: str = "resident"
    block_length: int = 32
    kernel: str = "auto"  # expert kernel on the device: auto | grouped_mm | loop


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise TideError(f"unknown device {name!r}", "use auto, cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TideError("--device cuda asked for, but no CUDA GPU is visible",
                        "use --device cpu, or check the NVIDIA driver")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if name == "auto":
        # bf16 is what the checkpoints hold; CPUs without bf16 units run fp32 faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise TideError(f"unknown dtype {name!r}", "use auto, bf16 or fp32")
    return table[name]


class Engine:
    def __init__(self, opts: EngineOptions, *, progress: LoadProgress | None = None,
                 quiet: bool = False) -> None:
        self.opts = opts
        self.path: Path = resolve_model(opts.model, quiet=quiet)
        self.ckpt = Checkpoint.open(self.path)
        self.cfg = self.ckpt.config
        self.tokenizer = ChatTokenizer(self.path)
        self.device = pick_device(opts.device)
        self.dtype = pick_dtype(opts.dtype, self.device)
        if self.cfg.max_position_embeddings % opts.block_length:
            raise TideError(f"--block-length {opts.block_length} does not divide the model's "
                            f"{self.cfg.max_position_embeddings} positions",
                            "use 32 (the trained block length)")
        total = dense_bytes(self.ckpt)
        done = 0

        def dense_tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("dense weights", done, total)

        # The embedding table stays on the host: a step reads 32 of its rows.
        self.weights = load_dense(self.ckpt, device=self.device, dtype=self.dtype,
                                  embed_device=torch.device("cpu"), progress=dense_tick)
        self.runtime = self._build_runtime(progress)
        self.model = LLaDA2Model(self.cfg, self.weights, self.runtime, device=self.device,
                                 dtype=self.dtype, block_length=opts.block_length)

    def _build_runtime(self, progress: LoadProgress | None):
        from tidecli.experts.runtime import ResidentRuntime, load_expert_pools

        if self.opts.policy != "resident":
            raise TideError(f"unknown policy {self.opts.policy!r}", "use resident")
        total = self.ckpt.routed_expert_bytes()
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress("experts", done, total)

        pools = load_expert_pools(self.ckpt, device=self.device, dtype=self.dtype, progress=tick)
        return ResidentRuntime(self.cfg, pools, device=self.device, dtype=self.dtype,
                               kernel=self.opts.kernel)

    # ---- prompts and generations ----------------------------------------------------------------

    def prompt_ids(self, prompt: str, *, system: str | None = None, raw: bool = False,
                   history: list[dict[str, str]] | None = None) -> list[int]:
        if not prompt.strip():
            raise TideError("the prompt is empty", "give some text to start from")
        if raw:
            ids = self.tokenizer.encode(prompt)
        else:
            messages = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.extend(history or [])
            messages.append({"role": "user", "content": prompt})
            ids = self.tokenizer.encode_chat(messages)
        if not ids:
            raise TideError("the prompt encodes to no tokens", "give some text to start from")
        return ids

    def check_length(self, n_prompt: int, settings: DecodeSettings) -> None:
        limit = self.cfg.max_position_embeddings
        if n_prompt + settings.gen_length > limit:
            raise TideError(
                f"prompt ({n_prompt} tokens) + --gen-length {settings.gen_length} exceeds the "
                f"model's {limit} positions",
                f"shorten the prompt or use --gen-length {max(1, limit - n_prompt)} or less")

    def decoder(self, ids: list[int], settings: DecodeSettings) -> BlockDiffusionDecoder:
        settings = replace(settings, block_length=self.opts.block_length) \
            if settings.block_length != self.opts.block_length else settings
        settings.validate(self.cfg.max_position_embeddings)
        self.check_length(len(ids), settings)
        t = self.tokenizer.ids
        return BlockDiffusionDecoder(self.model, ids, settings, mask_id=t.mask,
                                     eos_ids={t.eos}, device=self.device)

    def describe(self) -> dict:
        return {
            "model": str(self.path),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            **self.runtime.describe(),
        }

    def close(self) -> None:
        self.runtime.close()

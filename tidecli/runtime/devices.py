"""The device and dtype an engine runs on, from their option names."""

from __future__ import annotations

import torch

from tidecli.errors import TideError

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


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
    if name == "auto":
        # bf16 is what the checkpoints hold; CPUs without bf16 units run fp32 faster
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise TideError(f"unknown dtype {name!r}", "use auto, bf16 or fp32")
    return DTYPES[name]

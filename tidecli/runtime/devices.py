"""The device and dtype an engine runs on, from their option names."""

from __future__ import annotations

import os
import shutil

import torch

from tidecli.errors import TideError
from tidecli.hardware.probe import cpu_computes_bf16, free_cpu_threads
from tidecli.model.triton_util import triton_importable

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


def compile_missing(device: torch.device) -> str | None:
    """Why `--compile on` cannot run on `device`, or None. Inductor writes Triton kernels for
    a GPU and builds their launchers with the system's C compiler."""
    if device.type != "cuda":
        return "compiling the step needs a CUDA device"
    if not triton_importable():
        return "compiling the step needs Triton (pip install triton)"
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")):
        return "compiling the step needs a C compiler (gcc or clang) on PATH"
    return None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is what the checkpoints hold; CPUs without bf16 units run fp32 faster
        return torch.bfloat16 if device.type == "cuda" or cpu_computes_bf16() else torch.float32
    if name not in DTYPES:
        raise TideError(f"unknown dtype {name!r}", "use auto, bf16, fp32 or fp16")
    return DTYPES[name]


# the environment variables by which a user sets the CPU thread count for every OpenMP program
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_cpu_threads(requested: int = 0) -> int:
    """Set torch's CPU thread count and return it: `requested` when given, torch's own when
    OMP_NUM_THREADS or MKL_NUM_THREADS says, else the cores other processes leave free."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif not any(os.environ.get(v) for v in THREAD_ENV):
        torch.set_num_threads(free_cpu_threads())
    return torch.get_num_threads()

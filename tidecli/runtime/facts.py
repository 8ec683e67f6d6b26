"""Facts about this machine and run that the runtime and the planner decide with: free device
memory, RAM for the expert store, and whether missed experts can be streamed."""

from __future__ import annotations

import torch

from tidecli.experts.formats import ExpertFormat, is_compressed
from tidecli.experts.gather import stream_available
from tidecli.experts.qcache import total_bytes
from tidecli.experts.qkernel import qkernel_available
from tidecli.hardware.probe import usable_cores
from tidecli.memory import available_ram, ram_for_experts
from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tensorio import torch_dtype
from tidecli.planner.auto import MachineFacts
from tidecli.runtime.options import EngineOptions
from tidecli.units import GIB


def device_free_gib(device: torch.device) -> float:
    """What an engine may take when no --vram is given: 90 % of the GPU's free memory (on a
    CPU device, half of the available RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free / GIB * 0.9
    return available_ram() / GIB / 2


def stream_blocker(device: torch.device, model_dtype: torch.dtype, *, store_dtype: torch.dtype,
                   tiered: bool, pinned: bool = True,
                   fmt: ExpertFormat | None = None) -> str | None:
    """Why misses cannot be streamed from host memory here (None: they can). Compressed rows
    are read as they are by the dequantizing kernel."""
    if tiered:
        return "some experts live on disk (the tiered store)"
    if is_compressed(fmt):
        if device.type == "cuda" and not qkernel_available(device, model_dtype, fmt.name):
            return (f"the {fmt.name} kernel needs Triton and a bf16 or fp16 model"
                    + (" on an sm89+ GPU" if fmt.name == "fp8" else ""))
    elif device.type == "cuda" and store_dtype != model_dtype:  # raw rows are read
        return f"the experts are stored as {store_dtype} but the model runs in {model_dtype}"
    if device.type == "cuda" and not pinned:
        return "the host experts are not in pinned memory"
    return stream_available(device)


def routed_bytes(ckpt: Checkpoint, fmt: ExpertFormat) -> int:
    """The routed experts' bytes in the host store: the checkpoint's, or the compressed rows'."""
    return total_bytes(ckpt, fmt) if fmt.compressed else ckpt.routed_expert_bytes()


def machine_facts(ckpt: Checkpoint, opts: EngineOptions, device: torch.device,
                  dtype: torch.dtype, *, free_vram_gib: float,
                  fmt: ExpertFormat | None = None) -> MachineFacts:
    """The facts before any expert is loaded (the store, once built, may still refuse to be
    pinned: the runtime checks again then). `free_vram_gib`: what the device had free before
    the model was loaded (device_free_gib)."""
    ram = ram_for_experts(available_ram(), given_gib=opts.budgets.ram_gib)
    vram = opts.budgets.vram_gib
    return MachineFacts(
        cuda=device.type == "cuda",
        vram_gib=vram if vram is not None else free_vram_gib,
        ram_bytes=ram,
        stream_blocker=stream_blocker(device, dtype,
                                      store_dtype=torch_dtype(ckpt.expert_dtype()),
                                      tiered=routed_bytes(ckpt, fmt) > ram if fmt else
                                      ckpt.routed_expert_bytes() > ram, fmt=fmt),
        dtype_bytes=dtype.itemsize, misses=opts.residency.misses,
        experts_format=fmt.name if fmt is not None else "bf16",
        cpu_threads=opts.residency.cpu_threads, usable_cpus=usable_cores())

"""Option values checked before anything heavy is imported: a command that fails on a wrong
value fails at once, not after torch has loaded (seconds). The messages are those of the checks
deeper down (runtime/options.py, memory.py, decode/), which stay as they are for library users.
No torch, numpy or rich here."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from tidecli.errors import TideError

POLICIES = ("resident", "lru", "static", "tide")  # experts/policies.py's, tested equal
DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp32")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def choice(flag: str, value: str, choices: Iterable[str], *, what: str | None = None) -> None:
    """Refuse a value that is not one of `choices`."""
    options = tuple(choices)
    if value not in options:
        raise TideError(f"unknown {what or flag} {value!r}", f"use {', '.join(options)}")


def check_device(device: str) -> None:
    if not _DEVICE.match(device):
        raise TideError(f"unknown device {device!r}", "use auto, cpu or cuda")


def check_model_options(o: dict[str, Any]) -> None:
    check_device(o["device"])
    choice("--dtype", o["dtype"], DTYPES, what="dtype")


def check_runtime_options(o: dict[str, Any]) -> None:
    from tidecli.experts.modes import parse_misses  # torch-free

    choice("--policy", o["policy"], POLICIES, what="policy")
    parse_misses(o["misses"])
    if o["vram"] is not None and not 0 < o["vram"] < math.inf:
        raise TideError(f"--vram must be a positive number of GiB, got {o['vram']:g}",
                        "e.g. --vram 12")
    if o["ram"] is not None and not 0 < o["ram"] < math.inf:
        raise TideError(f"--ram must be positive, got {o['ram']:g}", "e.g. --ram 48")
    if o["tau"] is not None and o["tau"] < 1:
        raise TideError(f"--tau must be at least 1, got {o['tau']}", "e.g. --tau 4")
    if o["cpu_threads"] < 0:
        raise TideError(f"--cpu-threads must not be negative, got {o['cpu_threads']}",
                        "0 uses torch's default")


def check_decoding_options(o: dict[str, Any]) -> None:
    """The rules of decode/ (DecodeSettings.validate without a model), without torch."""
    from tidecli.decode.schedule import check_schedule  # torch-free

    check_schedule(gen_length=o["gen_length"], block_length=o["block_length"],
                   threshold=o["threshold"])
    edit = o.get("editing_threshold")
    if edit is not None and not 0 <= edit <= 1:
        raise TideError(f"--editing-threshold must be in [0, 1], got {edit}",
                        "0.5 (quality) or 0.0 (speed) are the 2.1 model-card values")
    temperature = o.get("temperature", 0.0)
    if not 0 <= temperature < math.inf:
        raise TideError(f"--temperature must not be negative or infinite, got {temperature}",
                        "0 means greedy")
    if o.get("top_p") is not None and not 0 < o["top_p"] <= 1:
        raise TideError("--top-p must be in (0, 1]", "e.g. 0.9")
    if o.get("top_k") is not None and o["top_k"] < 1:
        raise TideError("--top-k must be at least 1", "e.g. 50")
    if o.get("max_post_steps", 0) < 0:
        raise TideError("max post steps must not be negative", "the 2.1 default is 16")


def check_options(o: dict[str, Any]) -> None:
    """Every group present in a command's options (model, runtime, decoding)."""
    if "device" in o and "dtype" in o:
        check_model_options(o)
    if "policy" in o:
        check_runtime_options(o)
    if "gen_length" in o and "temperature" in o:
        check_decoding_options(o)

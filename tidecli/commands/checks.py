"""Option values checked before anything heavy is imported, so that a command given a wrong
value fails at once, not after torch has loaded: by the library's own rules (runtime/options.py,
decode/settings.py, memory.py), which need no torch. No torch or rich here."""

from __future__ import annotations

from typing import Any

from tidecli.runtime.options import LoadOptions


def check_device(device: str) -> None:
    LoadOptions(device=device).validate()


def check_model_options(o: dict[str, Any]) -> None:
    LoadOptions(device=o["device"], dtype=o["dtype"]).validate()


def check_options(o: dict[str, Any]) -> None:
    """Every group in a command's options (model, runtime, decoding)."""
    from tidecli.commands.options import decode_settings_of, engine_options_of

    if "policy" in o and "gen_length" in o:
        engine_options_of(o).validate()
        decode_settings_of(o).validate()
    elif "device" in o:
        check_model_options(o)

"""Where hardware profiles live: this machine's saved profile and the shipped reference ones.

Saved profiles are `config_dir()/profiles/<host>-<gpu>.json` (written atomically). Reference
profiles are the repository's `profiles/` folder, installed as the package `tidecli.profiles`
(setup.py), and are found by name, e.g. `rtx4090`.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

from tidecli.errors import TideError
from tidecli.fsutil import config_dir
from tidecli.hardware import probe
from tidecli.hardware.profile import HardwareProfile, load_profile_file

Progress = Callable[[str, int, int], None]


def profiles_dir() -> Path:
    return config_dir() / "profiles"


def current_gpu_name() -> str | None:
    """The GPU tide would run on here, as CUDA names it; None without a usable CUDA GPU.

    Asks torch rather than NVML so the key follows CUDA_VISIBLE_DEVICES and matches the name a
    measured profile records.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def machine_key(gpu_name: str | None, host: str | None = None) -> str:
    """File stem for a machine's profile: slugified hostname + GPU name (or `cpu`)."""
    return f"{probe.slug(host or probe.hostname())}--{probe.slug(gpu_name or 'cpu')}"


def saved_profile_path(gpu_name: str | None = None, *, detect: bool = True) -> Path:
    """This machine's profile file; the GPU is detected unless `detect` is False."""
    name = current_gpu_name() if detect and gpu_name is None else gpu_name
    return profiles_dir() / f"{machine_key(name)}.json"


def save_profile(profile: HardwareProfile, path: str | Path | None = None) -> Path:
    """Atomically write `profile` to `path`, by default this machine's saved-profile file."""
    if path is None:  # tide's own folder: created when missing
        return profile.save(profiles_dir() / f"{machine_key(profile.gpu_name)}.json",
                            make_parents=True)
    return profile.save(path)


def load_saved_profile(gpu_name: str | None = None, *,
                       detect: bool = True) -> HardwareProfile | None:
    """This machine's saved profile, None when there is none; a corrupt file is a TideError."""
    path = saved_profile_path(gpu_name, detect=detect)
    if not path.is_file():
        return None
    return load_profile_file(path)


# ---------------------------------------------------------------- reference profiles


def _reference_folder():
    """The package `tidecli.profiles` once tide is installed (a wheel or `pip install -e`); the
    repository's `profiles/` when tide runs from a source tree that is not installed."""
    try:
        return importlib.resources.files("tidecli.profiles")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "profiles"


def _reference_files() -> dict[str, Path]:
    """name → file of every shipped reference profile."""
    folder = _reference_folder()
    found: dict[str, Path] = {}
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.endswith(".json"):
                found[entry.name[: -len(".json")]] = Path(str(entry))
    return dict(sorted(found.items()))


def list_reference_profiles() -> list[str]:
    return list(_reference_files())


def load_reference_profile(name: str) -> HardwareProfile:
    files = _reference_files()
    key = probe.slug(name).replace("-", "")  # "RTX 4090", "rtx-4090" → "rtx4090"
    if key not in files:
        known = ", ".join(files) or "none shipped"
        raise TideError(f"no reference profile named {name!r}",
                        f"use one of: {known}; or a path to a profile .json")
    return load_profile_file(files[key])


def resolve_profile(spec: str | None) -> HardwareProfile:
    """None → this machine's saved profile; a path → that file; else a reference name or the
    key of another saved profile (see `tide profile --list`)."""
    if spec is None:
        profile = load_saved_profile()
        if profile is None:
            raise TideError("no hardware profile for this machine",
                            "run `tide profile`, or pass --profile NAME (see `tide profile "
                            "--list`)")
        return profile
    path = Path(spec).expanduser()
    if path.is_file() or spec.endswith(".json") or "/" in spec or "\\" in spec:
        return load_profile_file(path)  # a missing file is a one-line TideError there
    saved = profiles_dir() / f"{spec}.json"
    if saved.is_file():
        return load_profile_file(saved)
    return load_reference_profile(spec)


def load_or_create_profile(*, quick: bool = True, announce: Callable[[str], None],
                           progress: Progress | None = None,
                           expert_shape: tuple[int, int] | None = None) -> HardwareProfile:
    """The saved profile for this machine, or a quick one measured now and saved once."""
    profile = load_saved_profile()
    if profile is not None:
        return profile
    from tidecli.hardware.measure import measure_profile

    announce(f"no hardware profile for this machine yet: measuring "
             f"({'quick' if quick else 'full'}) …")
    profile = measure_profile(quick=quick, expert_shape=expert_shape, progress=progress)
    profile.save(saved_profile_path(profile.gpu_name, detect=False), make_parents=True)
    return profile

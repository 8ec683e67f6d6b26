"""`--model` → a local checkpoint folder: a path, a Hub repo id, or `demo`.

`demo` is a miniature LLaDA2 (the `tiny` preset, seed 0) written into the user cache on first use.
Hub ids come from the local Hub cache when present, else are downloaded with huggingface_hub —
the whole checkpoint (`resolve_model`), or only config.json (`config_folder`, for planning).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tidecli.errors import TideError
from tidecli.fsutil import cache_dir

DEMO = "demo"
DEMO_VERSION = "v2"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.md"]


def default_model() -> str:
    return os.environ.get("TIDE_MODEL") or DEMO


def demo_path() -> Path:
    return cache_dir() / "models" / f"demo-{DEMO_VERSION}"


def ensure_demo(*, quiet: bool = False) -> Path:
    path = demo_path()
    if (path / "config.json").is_file():
        return path
    from tidecli.model.synth import write_checkpoint

    if not quiet:
        print(f"tide: writing the built-in demo model to {path} (once)", file=sys.stderr)
    write_checkpoint(path, preset="tiny", seed=0, force=True, device="cpu")
    return path


def _is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def resolve_model(spec: str | None, *, quiet: bool = False) -> Path:
    spec = spec or default_model()
    if spec == DEMO:
        return ensure_demo(quiet=quiet)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TideError(f"--model {spec} is a file, not a checkpoint folder",
                            "point --model at the folder that holds config.json")
        return path
    if _is_hub_id(spec):
        return _from_hub(spec, quiet=quiet)
    raise TideError(f"model folder {spec} does not exist",
                    "give a checkpoint folder, a Hub id like inclusionAI/LLaDA2.0-mini, or demo")


def config_folder(spec: str | None) -> tuple[Path, str]:
    """(a folder holding the model's config.json, the name to show): for a Hub id not yet
    downloaded, only its config.json is fetched."""
    spec = spec or default_model()
    if spec != DEMO and not Path(spec).expanduser().exists() and _is_hub_id(spec):
        return _from_hub(spec, quiet=True, files=["config.json"]), spec
    return resolve_model(spec, quiet=True), spec


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes")


def _from_hub(repo_id: str, *, quiet: bool, files: list[str] | None = None) -> Path:
    """The local folder of `repo_id` (its `files`, default the checkpoint's): the local Hub
    cache first, then the network unless offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise TideError("huggingface_hub is not installed", "pip install huggingface_hub") from exc
    patterns = files or HUB_PATTERNS
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not (fully) cached: try the network below
        pass
    if _offline():
        raise TideError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set",
                        "unset HF_HUB_OFFLINE to download it, or pass a local folder to --model")
    if not quiet:
        print(f"tide: downloading {repo_id} from the Hugging Face Hub", file=sys.stderr)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        name = type(exc).__name__
        if "NotFound" in name or "RepositoryNotFound" in name:
            raise TideError(f"{repo_id} was not found on the Hub",
                            "check the spelling, e.g. inclusionAI/LLaDA2.0-mini") from exc
        raise TideError(f"cannot download {repo_id}: the Hub is unreachable ({name})",
                        "connect to the internet, or download the checkpoint elsewhere and pass "
                        "its folder to --model") from exc

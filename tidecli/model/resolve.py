"""`--model` → a local checkpoint folder: a path, a Hub repo id, or `demo`.

`demo` is a miniature LLaDA2 (the `tiny` preset, seed 0) written into the user cache on first use.
Hub ids come from the local Hub cache when present, else are downloaded with huggingface_hub —
the whole checkpoint (`resolve_model`), or only config.json (`config_folder`, for planning).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

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


HUB_PROBE_S = 3.0  # how long a connection to the Hub may take before it counts as unreachable
HUB_ETAG_TIMEOUT_S = 10.0  # per metadata request once the Hub answered
UNREACHABLE_HINT = ("connect to the internet, or download the checkpoint elsewhere and pass its "
                    "folder to --model")


def _hub_address() -> tuple[str, int] | None:
    """(host, port) that a download connects to first: the proxy when one is set, else the Hub
    endpoint (HF_ENDPOINT)."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlsplit(endpoint)
    proxy = None
    if url.hostname not in _no_proxy():
        names = ("https_proxy", "HTTPS_PROXY") if url.scheme == "https" else \
            ("http_proxy", "HTTP_PROXY")
        proxy = next((os.environ[n] for n in (*names, "all_proxy", "ALL_PROXY")
                      if os.environ.get(n)), None)
    target = url
    if proxy:
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not target.hostname:
        return None
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
    except ValueError:
        return None
    return target.hostname, port


def _no_proxy() -> set[str]:
    raw = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    return {h.strip() for h in raw.split(",") if h.strip()}


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether a TCP connection to the Hub (or the proxy in front of it) opens within
    `timeout` seconds, name lookup included: asked before a download so that an offline machine
    hears so at once instead of after the library's retries."""
    timeout = HUB_PROBE_S if timeout is None else timeout
    address = _hub_address()
    if address is None:
        return True  # an endpoint we cannot parse: let the library try and report
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup ignores the timeout
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's own warnings (retries, symlinks) off for the call: tide reports."""
    from huggingface_hub.utils import logging as hub_logging

    logger = hub_logging.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _from_hub(repo_id: str, *, quiet: bool, files: list[str] | None = None) -> Path:
    """The local folder of `repo_id` (its `files`, default the checkpoint's): the local Hub
    cache first, then the network unless offline or unreachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise TideError("huggingface_hub is not installed", "pip install huggingface_hub") from exc
    patterns = files or HUB_PATTERNS
    try:
        with _quiet_hub():
            return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                          local_files_only=True))
    except Exception:  # not (fully) cached: try the network below
        pass
    if _offline():
        raise TideError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE is set",
                        "unset HF_HUB_OFFLINE to download it, or pass a local folder to --model")
    if not hub_reachable():
        raise TideError(f"cannot download {repo_id}: the Hub is unreachable", UNREACHABLE_HINT)
    if not quiet:
        print(f"tide: downloading {repo_id} from the Hugging Face Hub", file=sys.stderr)
    try:
        with _quiet_hub():
            return Path(snapshot_download(repo_id, allow_patterns=patterns,
                                          etag_timeout=HUB_ETAG_TIMEOUT_S))
    except Exception as exc:
        raise _hub_error(repo_id, exc) from exc


def _hub_error(repo_id: str, exc: Exception) -> TideError:
    """What a failed download means for the user. Matched by class name along the MRO, which
    holds across huggingface_hub versions (the classes moved between modules)."""
    names = {c.__name__ for c in type(exc).__mro__}
    if "GatedRepoError" in names:
        return TideError(f"{repo_id} is gated on the Hub: its licence must be accepted first",
                         "accept it on the model's page, then `hf auth login`")
    if "RepositoryNotFoundError" in names:
        return TideError(f"{repo_id} was not found on the Hub",
                         "check the spelling, e.g. inclusionAI/LLaDA2.0-mini (a private "
                         "repository needs `hf auth login`)")
    if "RevisionNotFoundError" in names or "RemoteEntryNotFoundError" in names:
        return TideError(f"{repo_id} on the Hub lacks the files tide needs",
                         "check that it is a LLaDA2 checkpoint (config.json, *.safetensors)")
    return TideError(f"cannot download {repo_id}: the Hub is unreachable "
                     f"({type(exc).__name__})", UNREACHABLE_HINT)

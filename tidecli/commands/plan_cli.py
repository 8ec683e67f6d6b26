"""`tide plan`: how to run a model on a machine — expert budgets, τ, threads, predicted speed.

A plain plan reads only config.json (for a Hub id, only that file is fetched) and works on any
machine for any profile; `--calibrate` loads the model and runs real steps on this machine.
Imported by cli.py at start-up: nothing heavy at module level.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import typer

from tidecli.errors import TideError

PROFILE_HELP = ("Hardware profile: a reference name (e.g. rtx4090), a profile JSON, or this "
                "machine's saved profile when omitted.")


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        model: str | None = typer.Option(
            None, "--model", "-m",
            help="Checkpoint folder (config.json is enough), Hub id or 'demo'. Env: TIDE_MODEL."),
        profile: str | None = typer.Option(None, "--profile", "-p", help=PROFILE_HELP),
        vram: float | None = typer.Option(
            None, help="VRAM budget in GiB for tide's allocations (default: the profile's free "
                       "VRAM minus 0.5 GiB for the CUDA context and allocator slack)."),
        json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON on stdout."),
        trace: Path | None = typer.Option(
            None, help="Routing trace (.npz from `tide generate --trace`): this model's own "
                       "drift and misses instead of published statistics."),
        gen_length: int = typer.Option(512, help="Tokens to generate."),
        block_length: int = typer.Option(32, help="Diffusion block length."),
        threshold: float = typer.Option(0.95, help="Decoding confidence threshold."),
        context: int = typer.Option(4096, help="Tokens of KV cache to reserve on the GPU."),
        ram: float | None = typer.Option(
            None, help="Host RAM in GiB for the experts (kept in RAM + staging ring); those "
                       "beyond it stay on disk (default: the profile's available RAM minus "
                       "2 GiB, the embedding table and 1 GiB for the process)."),
        calibrate: bool = typer.Option(
            False, "--calibrate", help="Run the plan on real denoising steps on this machine, "
                                       "correct the cost model and plan again."),
        device: str = typer.Option("auto", help="--calibrate: auto, cuda or cpu."),
        misses: str = typer.Option(
            "auto", help="Where missed experts run: stream (read by the GPU from pinned RAM), "
                         "cpu (the paper's runtime), or auto (stream when the profile has a GPU "
                         "and every expert fits RAM, as the runtime does)."),
    ) -> None:
        """Plan expert offload for a model on a GPU: budgets, τ, CPU threads, predicted speed."""
        run_plan(model=model, profile=profile, vram=vram, json_out=json_out, trace=trace,
                 gen_length=gen_length, block_length=block_length, threshold=threshold,
                 context=context, ram=ram, calibrate=calibrate, device=device, misses=misses)


def _hub_config(repo_id: str) -> Path:
    """Only config.json of a Hub repository: local cache first, then the network."""
    import os

    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise TideError("huggingface_hub is not installed", "pip install huggingface_hub") from exc
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True)).parent
    except Exception:  # not cached: try the network below
        pass
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes"):
        raise TideError(f"{repo_id}'s config.json is not in the local Hub cache and "
                        "HF_HUB_OFFLINE is set",
                        "unset HF_HUB_OFFLINE, or pass a folder holding config.json to --model")
    try:
        return Path(hf_hub_download(repo_id, "config.json")).parent
    except Exception as exc:
        raise TideError(f"cannot fetch config.json of {repo_id}: {type(exc).__name__}",
                        "check the id (e.g. inclusionAI/LLaDA2.0-mini) and the network") from exc


def _model(spec: str | None, *, weights: bool):
    """(checkpoint folder, config, display name); without `weights` a Hub id costs one file."""
    from tidecli.model.config import load_config
    from tidecli.model.resolve import DEMO, HUB_ID, default_model, resolve_model

    spec = spec or default_model()
    local = Path(spec).expanduser()
    if not weights and spec != DEMO and not local.exists() and HUB_ID.match(spec) \
            and not spec.startswith((".", "/", "~")):
        folder = _hub_config(spec)
        return folder, load_config(folder), spec
    folder = resolve_model(spec)
    return folder, load_config(folder), spec


def _profile(spec: str | None):
    from tidecli.hardware.profile import load_profile_file

    if importlib.util.find_spec("tidecli.hardware.store") is not None:
        from tidecli.hardware.store import resolve_profile

        return resolve_profile(spec)
    # until the profile store lands, a profile JSON path is the one way to name one
    if spec and Path(spec).expanduser().is_file():
        return load_profile_file(Path(spec).expanduser())
    raise TideError("no hardware profile to plan for" if spec is None else
                    f"unknown hardware profile {spec!r}",
                    "pass --profile PATH to a profile JSON")


def run_plan(*, model: str | None, profile: str | None, vram: float | None, json_out: bool,
             trace: Path | None, gen_length: int, block_length: int, threshold: float,
             context: int, ram: float | None, calibrate: bool, device: str,
             misses: str = "auto") -> None:
    from tidecli.experts.trace import RoutingTrace
    from tidecli.planner import Workload, make_plan
    from tidecli.ui.plan_view import render_plan

    if misses not in ("auto", "stream", "cpu"):
        raise TideError(f"unknown --misses {misses!r}", "use auto, stream or cpu")

    folder, cfg, name = _model(model, weights=calibrate)
    prof = _profile(profile)
    workload = Workload(block_length=block_length, gen_length=gen_length, threshold=threshold,
                        context_tokens=context)
    routing = RoutingTrace.load(trace) if trace is not None else None
    plan = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload, trace=routing,
                     ram_gib=ram, model_name=name, misses=misses)
    if not calibrate:  # what the runtime would follow: with this machine's saved corrections
        from tidecli.planner.calibrate import load_calibration

        saved = load_calibration(profile=prof, model=folder, misses=plan.misses)
        if saved is not None:
            plan = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=workload,
                             trace=routing, ram_gib=ram, model_name=name, misses=plan.misses,
                             calibration=saved)
    if calibrate:
        from tidecli.planner.calibrate import calibrate_plan
        from tidecli.ui.console import byte_progress, err

        err.print(f"calibrating: {plan.policy}, τ {plan.tau}, "
                  f"{sum(plan.experts_per_layer.values())} expert slots on this machine …")
        with byte_progress() as progress:
            plan = calibrate_plan(model_path=folder, config=cfg, profile=prof, plan=plan,
                                  workload=workload, ram_gib=ram, device=device,
                                  progress=progress)
    render_plan(plan)
    if json_out:
        sys.stdout.write(json.dumps(plan.to_dict()) + "\n")
        sys.stdout.flush()

"""`--misses auto` leaves streaming only for a mode calibrated on this machine and predicted
clearly faster (planner/auto.py), in `tide plan` and in the runtime alike."""

from __future__ import annotations

import json
from dataclasses import replace

import torch

from tidecli.experts.modes import MissMode
from tidecli.memory import device_dense_bytes, workspace_bytes
from tidecli.model.config import load_config
from tidecli.planner import Calibration
from tidecli.planner.auto import AUTO_MARGIN, MachineFacts, auto_misses
from tidecli.planner.calibration import save_calibration
from tidecli.units import GIB

from helpers import gpu_profile, tide

# a calibration that makes a mode's every term tiny: the selection logic, not realism
FAST = Calibration(gpu_scale=0.01, cpu_scale=0.01, io_scale=0.01, launch_ms_per_layer=0.0,
                   overlap=True)


def _vram(cfg, slots_per_layer: int = 12) -> float:
    """A budget (GiB) with room for this many bf16 experts per layer (as test_auto_plan.py)."""
    fixed = device_dense_bytes(cfg, 2) + cfg.kv_bytes_per_token(2) * 4096 + \
        workspace_bytes(cfg, 32)
    return (fixed + cfg.num_moe_layers * slots_per_layer * cfg.expert_bytes(2) + 100) / GIB


def _profile(tmp_path):
    threads = torch.get_num_threads()
    prof = gpu_profile("test GPU", vram_gib=8, mem_gbps=500, h2d_gbps=20, cores=threads,
                       ram_gib=32, cpu_1tok_ms=0.05, gpu_expert_ms=0.02, threads=threads)
    return prof, prof.save(tmp_path / "p.json")


def _plan(tiny_ckpt, path, capsys, *extra):
    code, out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                           "--vram", repr(_vram(load_config(tiny_ckpt))), "--json", *extra],
                          capsys)
    assert code == 0, err
    return json.loads(out)


def test_auto_streams_unless_a_calibrated_mode_is_clearly_faster(tiny_ckpt, tmp_path, capsys):
    prof, path = _profile(tmp_path)
    assert _plan(tiny_ckpt, path, capsys)["misses"] == "stream"  # nothing calibrated
    # split is never a candidate, however fast its calibration says it is
    save_calibration(profile=prof, model=tiny_ckpt, misses="split", calibration=FAST)
    assert _plan(tiny_ckpt, path, capsys)["misses"] == "stream"
    save_calibration(profile=prof, model=tiny_ckpt, misses="cpu", calibration=FAST)
    plan = _plan(tiny_ckpt, path, capsys)
    assert plan["misses"] == "cpu" and plan["constants"]["calibration"]
    why = [n for n in plan["notes"] if n.startswith("--misses auto runs cpu misses")]
    assert why and "uncalibrated" in why[0] and "--misses stream keeps them" in why[0]
    # asked for by name, streaming stays
    assert _plan(tiny_ckpt, path, capsys, "--misses", "stream")["misses"] == "stream"


def test_auto_misses_needs_more_than_the_margin(tiny_ckpt, tmp_path):
    from tidecli.planner import Workload, make_plan

    prof, _path = _profile(tmp_path)
    cfg = load_config(tiny_ckpt)
    vram = _vram(cfg)
    stream = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=Workload(),
                       misses="stream")
    gpu = make_plan(config=cfg, profile=prof, vram_gib=vram, workload=Workload(), misses="gpu")

    def at(plan, ms):  # the same plan, predicted at `ms` a step
        b = plan.breakdown
        return replace(plan, breakdown=replace(b, gpu_dense_ms=ms - (b.step_ms - b.gpu_dense_ms)))

    s = at(stream, 10.0)
    just = at(gpu, 10.0 * (1 - AUTO_MARGIN) + 0.01)
    assert auto_misses(s, lambda m: just if m is MissMode.GPU else None) == (s, None)
    clear = at(gpu, 8.0)
    chosen, why = auto_misses(s, lambda m: clear if m is MissMode.GPU else None)
    assert chosen is clear and "gpu misses" in why and "round differently" not in why


def test_the_runtime_runs_the_mode_its_plan_chose(tiny_ckpt, tmp_path):
    """The engine's default plan (runtime/autoplan.py) on a CUDA machine's facts, and the
    mode the runtime then builds (runtime/build.py)."""
    from tidecli.runtime.autoplan import plan_for
    from tidecli.runtime.build import requested_misses
    from tidecli.runtime.options import engine_options

    prof, path = _profile(tmp_path)
    cfg = load_config(tiny_ckpt)
    vram = _vram(cfg)
    opts = engine_options(model=str(tiny_ckpt), policy="tide", profile=str(path), vram_gib=vram)
    facts = MachineFacts(cuda=True, vram_gib=vram, ram_bytes=32 * GIB, stream_blocker=None,
                         dtype_bytes=2)
    notices: list[str] = []
    assert plan_for(cfg, opts, facts, model=tiny_ckpt, notices=notices).misses == "stream"
    assert not notices
    save_calibration(profile=prof, model=tiny_ckpt, misses="gpu", calibration=FAST)
    plan = plan_for(cfg, opts, facts, model=tiny_ckpt, notices=notices)
    assert plan.misses == "gpu" and notices[0].startswith("--misses auto runs gpu misses")
    assert requested_misses(opts.residency, plan) is MissMode.GPU
    named = replace(opts.residency, misses=MissMode.STREAM)
    assert requested_misses(named, plan) is MissMode.STREAM  # --misses by name wins
    assert requested_misses(opts.residency, None) is MissMode.AUTO
    # where streaming is impossible, auto is cpu as before: nothing to choose
    blocked = replace(facts, stream_blocker="no Triton")
    assert plan_for(cfg, opts, blocked, model=tiny_ckpt, notices=[]).misses == "cpu"


def test_plan_says_which_uncalibrated_mode_a_calibration_might_make_auto_run(tmp_path, capsys):
    """Consumer reference profiles predict CPU misses faster than streaming for mini; `tide
    plan` says so and how to check it, and stops saying it once the mode is calibrated."""
    folder = tmp_path / "mini"
    code, _out, err = tide(["synth", str(folder), "--preset", "mini", "--config-only"], capsys)
    assert code == 0, err
    args = ["plan", "--model", str(folder), "--vram", "10", "--json"]
    code, out, err = tide(args + ["--profile", "rtx4070"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    hint = [n for n in plan["notes"] if "as fast as streaming here, uncalibrated" in n]
    assert plan["misses"] == "stream" and len(hint) == 1
    assert "`tide plan --calibrate --misses cpu`" in hint[0]
    code, out, err = tide(args + ["--profile", "h200"], capsys)  # streaming predicted fastest
    assert code == 0, err
    assert not [n for n in json.loads(out)["notes"] if "as fast as streaming" in n]


def test_plan_as_run_plans_each_mode_with_its_own_saved_corrections(tiny_ckpt, tmp_path):
    """The one rule `tide plan` and the engine share: the resolved mode with its saved
    calibration; candidates only under auto where misses stream, and only calibrated ones."""
    from tidecli.planner import Workload, make_plan
    from tidecli.planner.auto import plan_as_run

    prof, _path = _profile(tmp_path)
    cfg = load_config(tiny_ckpt)
    built: list[tuple[str, bool]] = []

    def build(mode, calibration):
        built.append((str(mode), calibration is not None))
        return make_plan(config=cfg, profile=prof, vram_gib=_vram(cfg), workload=Workload(),
                         misses=mode, calibration=calibration)

    saved = {MissMode.CPU: FAST}.get
    plan, why = plan_as_run(MissMode.STREAM, requested=MissMode.AUTO, build=build, saved=saved)
    assert plan.misses == "cpu" and why and built == [("stream", False), ("cpu", True)]
    built.clear()
    plan, why = plan_as_run(MissMode.STREAM, requested=MissMode.STREAM, build=build,
                            saved=saved)
    assert plan.misses == "stream" and why is None and built == [("stream", False)]
    built.clear()
    plan, why = plan_as_run(MissMode.CPU, requested=MissMode.AUTO, build=build, saved=saved)
    assert plan.misses == "cpu" and why is None and built == [("cpu", True)]

"""The runtime follows the planner by default; profiles measured once; saved calibrations;
streamed calibration's read timing; `tide bench --tau plan`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tidecli.errors import TideError
from tidecli.hardware.store import load_reference_profile
from tidecli.memory import device_dense_bytes, workspace_bytes
from tidecli.model.config import config_from_dict, load_config
from tidecli.model.presets import preset_config
from tidecli.planner import Calibration
from tidecli.planner.calibration import (
    calibration_path,
    load_calibration,
    save_calibration,
)
from tidecli.units import GIB

from helpers import gpu_profile, tide


def _profile_file(tmp_path, name="test GPU"):
    threads = torch.get_num_threads()
    prof = gpu_profile(name, vram_gib=8, mem_gbps=500, h2d_gbps=20, cores=threads, ram_gib=32,
                       cpu_1tok_ms=0.05, gpu_expert_ms=0.02, threads=threads)
    return prof, prof.save(tmp_path / "p.json")


def _vram_for(cfg, slots_per_layer: int, dtype_bytes: int = 2) -> float:
    """A budget (GiB) that leaves room for this many experts per layer in that dtype."""
    d = dtype_bytes
    fixed = device_dense_bytes(cfg, d) + cfg.kv_bytes_per_token(d) * 4096 + \
        workspace_bytes(cfg, 32)
    return (fixed + cfg.num_moe_layers * slots_per_layer * cfg.expert_bytes(d) + 100) / GIB


def _generate(eng, n=32):
    from tidecli.decode.diffusion import DecodeSettings

    ids = eng.prompt_ids("Hello there")
    dec = eng.decoder(ids, DecodeSettings(gen_length=n, block_length=32, threshold=1e-7))
    for _ev in dec.steps():
        pass
    return dec.x.tolist()  # the whole sequence, past any EOS


def test_tide_without_tau_follows_the_plan(tiny_ckpt, tmp_path):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    _prof, path = _profile_file(tmp_path)
    cfg = load_config(tiny_ckpt)
    # fp32 on the CPU: the plan counts the run's own bytes
    vram = _vram_for(cfg, 12, dtype_bytes=4)
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide", vram_gib=vram,
                               profile=str(path), threshold=1e-7), quiet=True)
    try:
        plan = eng.plan
        assert plan is not None and plan.profile == "test GPU"
        assert eng.runtime.budgets == plan.experts_per_layer
        assert sum(plan.experts_per_layer.values()) <= 12 * cfg.num_moe_layers
        assert plan.expert_bytes == cfg.expert_bytes(4)
        info = eng.describe()
        assert info.runtime.tau == plan.tau and info.plan.tau == plan.tau
        assert info.plan.predicted_step_ms > 0 and info.plan.calibrated is False
        tokens = _generate(eng)
        tide = eng.opts.residency  # another policy in the same process, then back
        eng.set_runtime(residency=replace(tide, policy="lru"))
        assert eng.plan is None
        eng.set_runtime(residency=tide)
        assert eng.plan is plan and eng.runtime.budgets == plan.experts_per_layer
    finally:
        eng.close()
    ref = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), quiet=True)
    try:
        assert _generate(ref) == tokens  # the planned placement is lossless
    finally:
        ref.close()


def test_given_tau_or_budgets_or_a_cpu_device_without_profile_skip_the_plan(tiny_ckpt, tmp_path):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    _prof, path = _profile_file(tmp_path)
    for extra in ({"tau": 2, "profile": str(path)}, {"experts_per_layer": 5, "profile": str(path)},
                  {"experts_per_layer": 5}):
        eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide", **extra),
                     quiet=True)
        try:
            assert eng.plan is None
            assert eng.describe().runtime.tau == extra.get("tau", 4)
        finally:
            eng.close()


def _cpu_profile():
    from tidecli.hardware.profile import HardwareProfile

    return HardwareProfile(name="CPU only on testhost", kind="measured", cpu_physical_cores=2,
                           ram_total_bytes=8 * GIB, ram_available_bytes=6 * GIB,
                           expert_shape=(2048, 512))


def test_a_missing_machine_profile_is_measured_once_and_saved(monkeypatch, tmp_path, capsys):
    import tidecli.hardware.measure as measure
    from tidecli.commands.setup import ensure_machine_profile
    from tidecli.hardware.store import load_saved_profile
    from tidecli.runtime.autoplan import machine_profile

    calls = []

    def fake(**kw):
        calls.append(kw)
        return _cpu_profile()

    monkeypatch.setattr(measure, "measure_profile", fake)
    monkeypatch.setattr("tidecli.hardware.store.current_gpu_name", lambda: None)
    monkeypatch.setenv("TIDE_CONFIG_DIR", str(tmp_path / "engine"))
    assert load_saved_profile() is None
    notices: list[str] = []
    first = machine_profile(None, notices=notices)
    assert len(calls) == 1 and calls[0]["quick"] is True
    assert len(notices) == 1 and "measured a quick one and saved it" in notices[0]
    again = machine_profile(None, notices=notices)
    assert len(calls) == 1 and len(notices) == 1  # saved: not measured again
    assert again.name == first.name == load_saved_profile().name
    # the commands' path: one line before measuring, nothing once saved
    monkeypatch.setenv("TIDE_CONFIG_DIR", str(tmp_path / "command"))
    capsys.readouterr()
    ensure_machine_profile()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 2 and len(lines) == 1 and "no hardware profile" in lines[0]
    ensure_machine_profile()
    assert len(calls) == 2 and capsys.readouterr().err == ""


def test_saved_calibration_round_trip_and_corrupt_file(tmp_path, tiny_ckpt):
    prof, _path = _profile_file(tmp_path)
    cal = Calibration(gpu_scale=0.8, cpu_scale=2.0, io_scale=1.3, launch_ms_per_layer=0.07,
                      overlap=True)
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="stream") is None
    path = save_calibration(profile=prof, model=tiny_ckpt, misses="stream", calibration=cal)
    assert path == calibration_path(profile=prof, model=tiny_ckpt, misses="stream")
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="stream") == cal
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="cpu") is None  # per mode
    path.write_text("{not json")
    with pytest.raises(TideError, match="cannot be read") as exc:
        load_calibration(profile=prof, model=tiny_ckpt, misses="stream")
    assert "calibrate" in exc.value.hint
    path.unlink()


def test_calibration_is_saved_and_the_default_plan_uses_it(tiny_ckpt, tmp_path, capsys):
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    _prof, path = _profile_file(tmp_path)
    cfg = load_config(tiny_ckpt)
    vram = _vram_for(cfg, 12)
    code, out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                           "--vram", repr(vram), "--calibrate", "--device", "cpu",
                           "--threshold", "1e-7", "--json"], capsys)
    assert code == 0, err
    cal = json.loads(out)["calibration"]
    # streamed misses: reads counted (not timed), their scale left at 1
    assert cal["measured_plan"]["misses"] == "stream"
    assert cal["measured"]["reads_per_step"] > 0 and cal["scales"]["io_scale"] == 1.0
    assert "counted, not timed" in err
    saved = json.loads(open(cal["saved_to"]).read())
    assert saved["scales"] == cal["scales"] and saved["misses"] == "stream"
    assert "saved for this machine and model" in err
    # a plain `tide plan` on this machine shows the plan the runtime follows: corrected
    code, out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                           "--vram", repr(vram), "--threshold", "1e-7", "--misses", "stream",
                           "--json"], capsys)
    assert code == 0, err
    plain = json.loads(out)
    assert plain["constants"]["calibration"] == cal["scales"]
    assert any(n.startswith("corrected by `tide plan --calibrate`") for n in plain["notes"])
    eng = Engine(engine_options(model=str(tiny_ckpt), device="cpu", dtype="bf16", policy="tide",
                               misses="stream", vram_gib=vram, profile=str(path)), quiet=True)
    try:
        assert eng.plan.constants["calibration"] == cal["scales"]
        assert eng.describe().plan.calibrated is True
    finally:
        eng.close()


def test_bench_tau_plan_reports_the_prediction(tiny_ckpt, tmp_path, capsys):
    from tidecli.commands.bench import _taus

    assert _taus("plan,1,4") == ["plan", 1, 4]
    with pytest.raises(TideError, match="whole numbers"):
        _taus("plan,soon")
    _prof, path = _profile_file(tmp_path)
    cfg = load_config(tiny_ckpt)
    out_json = tmp_path / "b.json"
    code, _out, err = tide(["bench", "--model", str(tiny_ckpt), "--device", "cpu",
                            "--policies", "tide", "--vram", repr(_vram_for(cfg, 12, 4)),
                            "--tau", "plan,2", "--workloads", "model", "--gen-length", "32",
                            "--profile", str(path), "-o", str(out_json)], capsys)
    assert code == 0, err
    runs = json.loads(out_json.read_text())["runs"]
    planned = [r for r in runs if r.get("planned")]
    assert len(planned) == 1 and runs[1]["tau"] == 2 and not runs[1].get("planned")
    r = planned[0]
    assert r["tau"] >= 1 and r["predicted_step_ms"] > 0 and r["plan_profile"] == "test GPU"
    assert r["measured_over_predicted"] == pytest.approx(
        r["denoise_step_ms"] / r["predicted_step_ms"], rel=1e-3)
    assert r["identical"]
    assert "the planner against the measurement" in err
    # the same plan with the workload's own routing statistics (the run's recorded trace)
    assert r["predicted_own_routing_ms"] > 0
    assert r["predicted_own_routing_ms"] != r["predicted_step_ms"]  # not the published ones
    assert r["measured_over_predicted_own_routing"] == pytest.approx(
        r["denoise_step_ms"] / r["predicted_own_routing_ms"], rel=1e-3)
    # and where each prediction puts the time, part by part
    for key, total in (("predicted_parts", "predicted_step_ms"),
                       ("predicted_own_routing_parts", "predicted_own_routing_ms")):
        parts = r[key]
        assert parts["step_ms"] == pytest.approx(r[total], abs=1e-3)
        assert parts["step_ms"] == pytest.approx(
            parts["gpu_dense_ms"] + parts["gpu_expert_ms"] + parts["stall_ms"], abs=1e-3)
    assert "own routing" in err


def test_a_bench_trace_keeps_each_prompts_blocks_apart():
    from tidecli.bench.harness import _joined
    from tidecli.experts.trace import RoutingTrace

    traces = []
    for p in range(2):
        tr = RoutingTrace(2, 4, [1, 2])
        for step in range(3):
            tr.append(np.full((2, 4), p + step), kind="step", block=0, step=step, tokens=32)
        traces.append(tr)
    joined = _joined(traces)
    assert len(joined) == 6 and joined.blocks == [0, 0, 0, 1000, 1000, 1000]
    assert joined.steps == [0, 1, 2, 0, 1, 2] and int(joined.counts[3][0, 0]) == 1


def test_the_runtime_and_the_planner_leave_the_same_slots_beside_the_scratch(tiny_ckpt):
    """Misses computed on the GPU pass through 16 scratch slots shared by every layer; the
    runtime (a --vram budget) and the planner must both take them from the total, once."""
    from tidecli.experts.modes import SCRATCH_SLOTS, MissMode
    from tidecli.memory import device_memory
    from tidecli.model.checkpoint import Checkpoint
    from tidecli.planner import make_plan
    from tidecli.planner.auto import MachineFacts
    from tidecli.runtime.build import expert_budgets
    from tidecli.runtime.options import engine_options

    ckpt = Checkpoint.open(tiny_ckpt)
    cfg = ckpt.config
    layers = cfg.num_moe_layers
    assert SCRATCH_SLOTS % layers  # else the two ways of counting could not differ
    mem = device_memory(cfg, 64.0)
    prof = gpu_profile("rtx4090", vram_gib=24, mem_gbps=1008, h2d_gbps=25, cores=16, ram_gib=64,
                       cpu_1tok_ms=0.1, gpu_expert_ms=0.01)
    seen = set()
    for extra in range(SCRATCH_SLOTS + 2, SCRATCH_SLOTS + 3 * layers + 2):
        vram = (mem.fixed + extra * mem.expert_bytes + 1) / GIB
        opts = engine_options(model=str(tiny_ckpt), policy="tide", tau=2, vram_gib=vram,
                              misses="gpu")
        facts = MachineFacts(cuda=True, vram_gib=vram, ram_bytes=64 * GIB, stream_blocker=None,
                             dtype_bytes=2, misses=MissMode.GPU)
        budgets, _ = expert_budgets(ckpt, opts, plan=None, facts=facts, mode=MissMode.GPU)
        plan = make_plan(config=cfg, profile=prof, vram_gib=vram, misses="gpu", cuda=True)
        want = (extra - SCRATCH_SLOTS) // layers
        assert set(budgets.values()) == {want}
        assert set(plan.experts_per_layer.values()) == {want}
        seen.add(want)
    assert len(seen) > 1


def test_cpu_misses_compute_in_the_dtype_the_profile_measured_fastest(tiny_ckpt):
    """A plan's CPU costs are the profile's times in the dtype it found fastest on that CPU
    (fp32 on CPUs without bf16 units); CPU misses beside a GPU then run in that dtype. On a CPU
    device they keep the model's dtype (the resident tokens)."""
    from dataclasses import replace as dc_replace

    from tidecli.model.checkpoint import Checkpoint
    from tidecli.planner import make_plan
    from tidecli.runtime.build import cpu_setup
    from tidecli.runtime.options import ResidencyOptions

    cfg = Checkpoint.open(tiny_ckpt).config
    prof = gpu_profile("rtx3060", vram_gib=12, mem_gbps=360, h2d_gbps=12, cores=6, ram_gib=32,
                       cpu_1tok_ms=0.4, gpu_expert_ms=0.02)
    for measured, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        plan = make_plan(config=cfg, profile=dc_replace(prof, cpu_dtype=measured), vram_gib=0.15,
                         misses="cpu", cuda=True)
        assert plan.cpu_dtype == measured and plan.to_dict()["cpu_dtype"] == measured
        threads, mode, dtype = cpu_setup(ResidencyOptions(), plan, torch.device("cuda"))
        assert (threads, mode, dtype) == (plan.cpu_threads, plan.cpu_mode, want)
        assert cpu_setup(ResidencyOptions(), plan, torch.device("cpu"))[2] is None
    streamed = make_plan(config=cfg, profile=prof, vram_gib=0.15, misses="stream", cuda=True)
    assert cpu_setup(ResidencyOptions(cpu_threads=3), streamed, torch.device("cuda")) == \
        (3, "intra", None)


def test_cpu_costs_use_the_threads_the_runtime_will_have():
    from tidecli.planner.costs import hardware_costs

    prof = load_reference_profile("h200")
    cfg = config_from_dict(preset_config("mini"))
    assert set(prof.cpu_expert_ms) >= {4, 8, 16}
    six = hardware_costs(cfg=cfg, profile=prof, block_length=32, context_tokens=4096,
                         cpu_threads=6)
    assert six.cpu_threads == 4 and any("profile's for 4" in n for n in six.notes)
    capped = hardware_costs(cfg=cfg, profile=prof, block_length=32, context_tokens=4096,
                           max_cpu_threads=8)
    assert capped.cpu_threads <= 8
    free = hardware_costs(cfg=cfg, profile=prof, block_length=32, context_tokens=4096)
    assert free.cpu_threads == prof.cpu_best_threads


def test_compiled_steps_have_their_own_calibration(tmp_path, tiny_ckpt, capsys):
    """A compiled step has fewer kernels, so a smaller fixed cost: its corrections are saved
    and used apart from the eager step's. On the CPU the steps run eager whatever --compile
    says, so a calibration run there is saved as eager."""
    from tidecli.runtime.autoplan import runs_compiled
    from tidecli.runtime.options import engine_options

    prof, path = _profile_file(tmp_path)
    cal = Calibration(gpu_scale=0.9, cpu_scale=1.0, io_scale=1.0, launch_ms_per_layer=0.02)
    assert calibration_path(profile=prof, model=tiny_ckpt, misses="stream", compiled=True) != \
        calibration_path(profile=prof, model=tiny_ckpt, misses="stream")
    save_calibration(profile=prof, model=tiny_ckpt, misses="stream", calibration=cal,
                     compiled=True)
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="stream") is None
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="stream",
                            compiled=True) == cal
    cfg = load_config(tiny_ckpt)
    vram = _vram_for(cfg, 12)
    base = ["plan", "--model", str(tiny_ckpt), "--profile", str(path), "--vram", repr(vram),
            "--misses", "stream", "--json"]
    for flag, used in ((["--compile", "on"], True), ([], False)):
        code, out, err = tide(base + flag, capsys)
        assert code == 0, err
        notes = json.loads(out)["notes"]
        assert any(n.startswith("corrected by `tide plan --calibrate`") for n in notes) == used
    # the engine asks for the compiled corrections only where its steps compile
    opts = engine_options(model=str(tiny_ckpt), compile="on")
    assert not runs_compiled(opts, cuda=False)
    assert not runs_compiled(engine_options(model=str(tiny_ckpt)), cuda=True)
    code, out, err = tide(base[:-1] + ["--calibrate", "--device", "cpu", "--threshold", "1e-7",
                                       "--compile", "on", "--json"], capsys)
    assert code == 0, err
    measured = json.loads(out)["calibration"]["measured"]
    assert measured["compiled"] is False
    assert load_calibration(profile=prof, model=tiny_ckpt, misses="stream") is not None


def test_tide_plan_reads_each_modes_saved_calibration_once(tiny_ckpt, tmp_path, capsys,
                                                           monkeypatch):
    from tidecli.planner import calibration

    _prof, path = _profile_file(tmp_path)
    vram = _vram_for(load_config(tiny_ckpt), 12)
    reads = []
    real = calibration.load_calibration

    def counting(**kw):
        reads.append(kw["misses"])
        return real(**kw)

    monkeypatch.setattr(calibration, "load_calibration", counting)
    code, _out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                            "--vram", repr(vram), "--threshold", "1e-7", "--json"], capsys)
    assert code == 0, err
    assert reads and len(reads) == len(set(reads))  # auto asks for every candidate mode once

"""The planner: cost model by hand, τ* by brute force, budgets within VRAM, the d/f estimator on a
synthetic trace of known drift, the `tide plan` command and `--calibrate` on the CPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tidecli.errors import TideError
from tidecli.experts.trace import RoutingTrace
from tidecli.hardware.profile import HardwareProfile
from tidecli.memory import device_dense_bytes, workspace_bytes
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.planner import (
    Calibration,
    HardwareCosts,
    Workload,
    cpu_cost,
    io_cost,
    make_plan,
    predict,
    predictor,
    solve_tau,
    trace_stats,
)
from tidecli.planner.allocate import allocate_slots
from tidecli.planner.calibration import fit_calibration
from tidecli.planner.costs import CUDA_CONTEXT_RESERVE_GIB
from tidecli.planner.model import Problem, tau_objective
from tidecli.planner.published import PublishedRouting
from tidecli.planner.report import Measurement
from tidecli.planner.stats import (
    published_stats,
    refresh_ages,
)
from tidecli.units import GIB

from helpers import FLASH, MINI, fifo_trace, gpu_profile, tide, toy_problem

CONSUMER = [
    gpu_profile("RTX 3060 12 GB", vram_gib=12, mem_gbps=360, h2d_gbps=24, cores=8, ram_gib=32,
                cpu_1tok_ms=0.16, gpu_expert_ms=0.045),
    gpu_profile("RTX 4060 Ti 16 GB", vram_gib=16, mem_gbps=288, h2d_gbps=12, cores=8,
                ram_gib=64, cpu_1tok_ms=0.14, gpu_expert_ms=0.05),
    gpu_profile("RTX 3090 24 GB", vram_gib=24, mem_gbps=936, h2d_gbps=24, cores=16, ram_gib=64,
                cpu_1tok_ms=0.12, gpu_expert_ms=0.02),
    gpu_profile("RTX 4090 24 GB", vram_gib=24, mem_gbps=1008, h2d_gbps=25, cores=16, ram_gib=96,
                cpu_1tok_ms=0.11, gpu_expert_ms=0.018),
    gpu_profile("RTX 5090 32 GB", vram_gib=32, mem_gbps=1792, h2d_gbps=50, cores=16,
                ram_gib=192, cpu_1tok_ms=0.1, gpu_expert_ms=0.012),
]


def reference_profiles() -> list[HardwareProfile]:
    """Our consumer set plus whatever the profile store ships (when it exists)."""
    out = list(CONSUMER)
    if importlib.util.find_spec("tidecli.hardware.store") is None:
        return out
    from tidecli.hardware import store

    if not hasattr(store, "list_reference_profiles"):
        return out
    for item in store.list_reference_profiles():
        if isinstance(item, HardwareProfile):
            out.append(item)
        else:
            name = item if isinstance(item, str) else getattr(item, "name", str(item))
            out.append(store.resolve_profile(name))
    return out


# ---- the cost model by hand ---------------------------------------------------------------------


def test_paper_terms_by_hand():
    # C_IO · (B·T/τ) · [1 − (1 − d)^τ] = 0.5 · 40 · 0.19
    assert io_cost(c_io_ms=0.5, experts=10, steps=8, tau=2, drift=0.1) == pytest.approx(3.8)
    assert io_cost(c_io_ms=0.5, experts=10, steps=8, tau=1, drift=0.1) == pytest.approx(4.0)
    # C_CPU · T · B · f
    assert cpu_cost(c_cpu_ms=0.2, steps=8, experts=10, f=0.3) == pytest.approx(4.8)


def test_step_time_by_hand():
    p = toy_problem()
    bd = predict(p, np.array([2, 2]), 2)
    # per layer: GPU 4·(1−½)·0.5 = 1 ms, CPU 8·½ pairs · (1 ms / 2 tokens) = 2 ms → pays 2
    assert bd.gpu_dense_ms == 2.0 and bd.gpu_expert_ms == pytest.approx(2.0)
    assert bd.cpu_miss_ms == pytest.approx(4.0) and bd.cpu_stall_ms == pytest.approx(2.0)
    # per refresh 2·(1 − 0.75²) = 0.875 experts per layer → 1.75 ms, every 2nd step, hidden
    assert bd.pcie_ms == pytest.approx(0.875) and bd.pcie_stall_ms == 0.0
    assert bd.step_ms == pytest.approx(6.0)
    assert bd.hit_rate == pytest.approx(0.5)
    # no overlap (a CPU device): the layer pays GPU + CPU, and the copies in full
    bd = predict(toy_problem(overlap=False), np.array([2, 2]), 2)
    assert bd.step_ms == pytest.approx(2.0 + 2.0 + 4.0 + 0.875)
    # slow copies: 17.5 ms per refresh against 6 ms of compute stall the rest, every 2nd step
    bd = predict(toy_problem(c_io=10.0), np.array([2, 2]), 2)
    assert bd.pcie_stall_ms == pytest.approx((17.5 - 6.0) / 2)
    assert bd.step_ms == pytest.approx(6.0 + 5.75)


def test_tau_objective_by_hand():
    # per layer: I/O 1·(2·4/2)·(1 − 0.75²) = 1.75; f = ½·8/2 = 2 per slot → CPU 0.5·4·2·2 = 8
    assert tau_objective(toy_problem(), np.array([2, 2]), 2) == pytest.approx(2 * (1.75 + 8.0))


def test_refresh_ages_follow_the_async_runtime():
    assert refresh_ages(1, 5) == [1, 1, 1, 1, 1]
    assert refresh_ages(2, 5) == [2, 1, 2, 1, 2]
    assert refresh_ages(3, 7) == [3, 1, 2, 3, 1, 2, 3]


def _brute_tau(p: Problem, budgets: np.ndarray) -> tuple[int, list[float]]:
    st, co, t = p.stats, p.costs, p.steps
    values = []
    for tau in range(1, t):
        ages = [min(a, st.max_age) for a in refresh_ages(tau, t)]
        total = 0.0
        for j, b in enumerate(budgets):
            missed = st.pairs * np.mean([st.miss_pairs[j, a, b] for a in ages])
            # a missed call's tokens under this τ: missed pairs over missed experts
            experts = st.distinct[j] * np.mean([st.miss_experts[j, a, b] for a in ages])
            per_call = missed / experts if experts > 1e-9 else st.tokens_per_call[j, b]
            per_call = max(1.0, per_call)
            c_cpu = co.cpu_call_ms(per_call) / per_call
            total += co.c_io_ms * (b * t / tau) * (1 - (1 - st.drift[j, b]) ** tau)
            total += c_cpu * t * missed
        values.append(total)
    return int(np.argmin(values)) + 1, values


@pytest.mark.parametrize("seed", range(6))
def test_tau_star_is_the_brute_force_argmin(seed):
    rng = np.random.default_rng(seed)
    steps = int(rng.integers(3, 33))
    stats = published_stats(MINI, block_length=32, max_age=steps)
    # random costs make either term dominate
    costs = HardwareCosts(c_io_ms=float(rng.uniform(0.01, 5)), gpu_expert_ms=0.02, dense_ms=5.0,
                          dense_read_ms=4.0, launch_ms=1.0, cpu_threads=8,
                          cpu_points=((1.0, float(rng.uniform(0.01, 1))), (32.0, 1.0)))
    p = Problem(cfg=MINI, costs=costs, stats=stats, steps=steps)
    budgets = rng.integers(0, 257, size=MINI.num_moe_layers)
    tau, values = solve_tau(p, budgets)
    want, brute = _brute_tau(p, budgets)
    assert tau == want
    assert np.allclose(values, brute)


def test_tau_star_on_trace_stats_is_the_brute_force_argmin():
    trace = fifo_trace(layers=3, experts=64, distinct=12, turnover=2, blocks=3, steps=10)
    cfg = _cfg_for(trace)
    stats = trace_stats(trace, cfg=cfg, max_age=10)
    for c_io in (0.01, 0.3, 3.0):
        costs = HardwareCosts(c_io_ms=c_io, gpu_expert_ms=0.02, dense_ms=1.0, dense_read_ms=1.0,
                              launch_ms=0.0, cpu_threads=4, cpu_points=((1.0, 0.2), (8.0, 0.4)))
        p = Problem(cfg=cfg, costs=costs, stats=stats, steps=10)
        budgets = np.array([6, 12, 20])
        assert solve_tau(p, budgets)[0] == _brute_tau(p, budgets)[0]


# ---- budgets and plans --------------------------------------------------------------------------


def test_allocate_slots_is_optimal_and_within_total():
    rng = np.random.default_rng(3)
    for _ in range(20):
        costs = rng.uniform(0, 10, size=(3, 5))
        total = int(rng.integers(3, 13))
        got = allocate_slots(costs, total)
        assert got.sum() <= total and got.min() >= 1
        best = min(sum(costs[j, b] for j, b in enumerate(bs))
                   for bs in itertools.product(range(1, 5), repeat=3) if sum(bs) <= total)
        assert costs[np.arange(3), got].sum() == pytest.approx(best)


@pytest.mark.parametrize("cfg", [MINI, FLASH], ids=["mini", "flash"])
def test_plans_for_every_reference_profile_are_sane(cfg):
    for prof, vram in itertools.product(reference_profiles(), (8, 12, 16, 24)):
        try:
            plan = make_plan(config=cfg, profile=prof, vram_gib=vram)
        except TideError as exc:
            assert "cannot hold the dense part" in exc.message and exc.hint
            continue
        _check_sane(plan, cfg)
        if cfg is FLASH and prof.ram_total_bytes < 190 * GIB:
            assert any("host RAM" in w for w in plan.warnings)


def _check_sane(plan, cfg):
    assert plan.used_bytes <= plan.vram_budget_bytes
    bs = list(plan.experts_per_layer.values())
    assert sorted(plan.experts_per_layer) == cfg.moe_layers
    assert all(0 <= b <= cfg.num_experts for b in bs)
    assert 1 <= plan.tau <= plan.steps_per_block - 1
    assert len(plan.tau_costs_ms) == plan.steps_per_block - 1
    assert plan.tau_costs_ms[plan.tau - 1] == min(plan.tau_costs_ms)
    bd = plan.breakdown
    assert all(math.isfinite(v) and v >= 0 for v in bd.to_dict().values())
    assert plan.predicted_step_ms == pytest.approx(bd.gpu_dense_ms + bd.gpu_expert_ms
                                                   + bd.cpu_stall_ms + bd.pcie_stall_ms
                                                   + bd.disk_stall_ms + bd.scratch_ms
                                                   + bd.host_ms)
    assert plan.predicted_step_ms >= bd.gpu_dense_ms > 0
    assert 0 < plan.tokens_per_s < plan.steps_per_s * plan.block_length
    assert plan.cpu_threads >= 1
    d = plan.to_dict()
    for key in ("experts_per_layer", "tau", "cpu_threads", "predicted_step_ms", "breakdown"):
        assert key in d
    json.dumps(d)


def test_more_vram_is_never_predicted_slower():
    prof = CONSUMER[3]
    steps = [make_plan(config=MINI, profile=prof, vram_gib=v).predicted_step_ms
             for v in (4, 6, 8, 12, 16, 23)]
    assert all(b <= a * 1.02 for a, b in zip(steps, steps[1:], strict=False))


def test_dense_part_that_does_not_fit_is_one_clear_error():
    with pytest.raises(TideError) as info:
        make_plan(config=FLASH, profile=CONSUMER[0], vram_gib=4)
    msg = info.value.message
    assert "cannot hold the dense part" in msg and "\n" not in msg
    assert "give at least" in info.value.hint


def test_default_vram_is_the_profile_minus_the_context_reserve():
    prof = CONSUMER[0]
    plan = make_plan(config=MINI, profile=prof)
    assert plan.vram_budget_bytes == int((12 - CUDA_CONTEXT_RESERVE_GIB) * GIB)
    cpu_only = HardwareProfile(name="laptop", gpu_name=None)
    with pytest.raises(TideError, match="without a CUDA GPU"):
        make_plan(config=MINI, profile=cpu_only)


def test_everything_fits_means_resident():
    plan = make_plan(config=MINI, profile=CONSUMER[4], vram_gib=80)
    assert plan.policy == "resident" and set(plan.experts_per_layer.values()) == {256}
    assert plan.breakdown.cpu_miss_ms == 0 and plan.breakdown.pcie_ms == 0


def test_missing_profile_figures_become_notes_not_crashes():
    bare = HardwareProfile(name="bare", gpu_name="GPU", vram_total_bytes=16 * GIB)
    plan = make_plan(config=MINI, profile=bare, vram_gib=12)
    _check_sane(plan, MINI)
    assert any("estimated" in n or "assumed" in n for n in plan.notes)


def test_workload_sets_the_steps_per_block():
    prof = CONSUMER[3]
    assert make_plan(config=MINI, profile=prof, vram_gib=12).steps_per_block == 13  # 32 / 2.55
    assert make_plan(config=FLASH, profile=prof, vram_gib=24).steps_per_block == 10  # 32 / 3.19
    quota_only = make_plan(config=MINI, profile=prof, vram_gib=12,
                           workload=Workload(threshold=1.0))
    assert quota_only.steps_per_block == 32 and len(quota_only.tau_costs_ms) == 31
    with pytest.raises(TideError, match="--threshold"):
        make_plan(config=MINI, profile=prof, vram_gib=12, workload=Workload(threshold=0))
    long = make_plan(config=MINI, profile=prof, vram_gib=12, workload=Workload(gen_length=8192))
    assert any("raise --context" in w for w in long.warnings)


# ---- the estimator of d and f -------------------------------------------------------------------


def _cfg_for(trace: RoutingTrace):
    return config_from_dict(preset_config("tiny", layers=trace.num_layers + 1, overrides={
        "num_experts": trace.num_experts, "n_group": 4, "topk_group": 2}))


def test_estimator_recovers_a_known_drift():
    trace = fifo_trace(layers=2, experts=256, distinct=20, turnover=2, blocks=4, steps=8)
    stats = trace_stats(trace, cfg=_cfg_for(trace), max_age=8)
    d_true = 2 / 20
    assert np.allclose(stats.distinct, 20)
    assert np.allclose(stats.drift[:, 20], d_true)
    for a in range(8):
        assert np.allclose(stats.miss_experts[:, a, 20], a * d_true)
        assert np.allclose(stats.miss_pairs[:, a, 20], a * d_true)  # equal loads: same share
    assert np.allclose(stats.miss_pairs[:, :, 256], 0.0)  # every expert resident: no miss
    assert np.allclose(stats.drift[:, 256], 0.0)
    assert stats.steps_per_block == 8 and stats.source == "trace"
    with pytest.raises(TideError, match="another model"):
        trace_stats(trace, cfg=MINI, max_age=8)
    # the τ program's I/O term with this d: refreshing every τ steps copies B·[1 − (1 − d)^τ]
    assert io_cost(c_io_ms=1, experts=20, steps=8, tau=4, drift=d_true) == pytest.approx(
        1 * 20 * 8 / 4 * (1 - 0.9**4))


def test_published_defaults_reproduce_the_published_figures():
    """The published model draws ≈ 70 distinct experts of 256 per 32-token step with count
    similarity ≈ 0.985 one step apart and ≈ 0.95 five apart; the defaults are measured on it."""
    from tidecli.bench.oracle import routing_stats

    gen = PublishedRouting(num_experts=256, experts_per_token=8, num_layers=4)
    counts = np.stack([gen.counts(b, s) for b in range(4) for s in range(24)])
    got = routing_stats(counts, [b for b in range(4) for _ in range(24)])
    assert got["distinct_per_layer_step"] == pytest.approx(70, abs=3)
    assert got["similarity_lag1"] == pytest.approx(0.985, abs=0.005)
    assert got["similarity_lag5"] == pytest.approx(0.95, abs=0.01)
    stats = published_stats(MINI, block_length=32, max_age=12)
    assert stats.source == "published" and stats.ram_cover is None
    assert stats.distinct == pytest.approx(np.full(MINI.num_moe_layers, 70), abs=3)
    assert np.all(np.diff(stats.miss_pairs[0, :, 64]) >= -1e-9)  # misses grow with age
    assert np.allclose(stats.miss_pairs[:, :, 256], 0.0)
    # a step brings several experts its predecessor did not use (the rarely used ones churn),
    # far more than 1 − similarity would suggest
    assert stats.miss_experts[0, 1, 76] > 3 * (1 - 0.985)


def test_a_trace_with_unequal_layers_gets_per_layer_budgets():
    trace = fifo_trace(layers=4, experts=256, distinct=0, turnover=1, blocks=3, steps=12,
                       per_layer=[8, 8, 60, 60])
    cfg = config_from_dict(preset_config("mini", layers=5))
    trace.moe_layers = cfg.moe_layers
    prof = CONSUMER[3]
    fixed = (device_dense_bytes(cfg) + cfg.kv_bytes_per_token() * 4096
             + workspace_bytes(cfg, 32))
    vram = (fixed + 4 * 34 * cfg.expert_bytes()) / GIB  # 34 slots a layer if uniform
    uniform = make_plan(config=cfg, profile=prof, vram_gib=vram)
    plan = make_plan(config=cfg, profile=prof, vram_gib=vram, trace=trace)
    assert plan.used_bytes <= plan.vram_budget_bytes
    assert not plan.uniform
    bs = [plan.experts_per_layer[layer] for layer in cfg.moe_layers]
    assert bs[2] > bs[0] and bs[3] > bs[1]
    assert plan.alternatives["per_layer"] < plan.alternatives["uniform"]
    assert list(uniform.experts_per_layer.values()) == [34] * 4


# ---- calibration fit ----------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [True, False], ids=["cuda", "cpu-device"])
@pytest.mark.parametrize("truth", [
    Calibration(cpu_scale=3.0, io_scale=0.5, launch_ms_per_layer=2.5),
    Calibration(gpu_scale=0.4, cpu_scale=0.7, io_scale=2.0, launch_ms_per_layer=0.0),
], ids=["slow-host", "fast-device"])
def test_fit_calibration_recovers_a_known_correction(truth, overlap):
    from dataclasses import replace

    trace = fifo_trace(layers=4, experts=256, distinct=60, turnover=6, blocks=3, steps=12)
    cfg = config_from_dict(preset_config("mini", layers=5))
    trace.moe_layers = cfg.moe_layers
    plan = make_plan(config=cfg, profile=CONSUMER[0], vram_gib=1.5, trace=trace, misses="cpu")
    model = predictor(plan=plan, config=cfg, profile=CONSUMER[0], trace=trace)
    truth = replace(truth, overlap=overlap)
    real = model(truth)  # what a machine behaving like `truth` would show
    m = Measurement(device="cuda:0" if overlap else "cpu", overlap=overlap, steps=20,
                    step_ms=real.step_ms, cpu_ms=real.cpu_miss_ms, copy_ms=real.pcie_ms,
                    stall_ms=0.0, hit_rate=real.hit_rate, trace=trace,
                    reads=real.pcie_ms / real.io_expert_ms)
    cal = fit_calibration(predictor=model, measured=m)
    assert cal.cpu_scale == pytest.approx(truth.cpu_scale, rel=1e-6)
    assert cal.io_scale == pytest.approx(truth.io_scale, rel=1e-6)
    assert cal.launch_ms_per_layer == pytest.approx(truth.launch_ms_per_layer, abs=1e-6)
    assert cal.gpu_scale == pytest.approx(truth.gpu_scale, rel=1e-4)
    assert model(cal).step_ms == pytest.approx(real.step_ms, rel=1e-6)


def test_calibration_scales_the_link_by_the_time_per_expert_moved():
    """With gpu misses the runtime keeps each expert it read into a scratch slot, so it moves
    fewer experts than the model (which counts a promotion besides). Copies at the profile's
    speed per expert keep the link's scale at 1, however many fewer there were."""
    trace = fifo_trace(layers=4, experts=256, distinct=60, turnover=6, blocks=3, steps=12)
    cfg = config_from_dict(preset_config("mini", layers=5))
    trace.moe_layers = cfg.moe_layers
    plan = make_plan(config=cfg, profile=CONSUMER[0], vram_gib=1.5, trace=trace, misses="gpu")
    model = predictor(plan=plan, config=cfg, profile=CONSUMER[0], trace=trace)
    base = model(Calibration())
    moved = 0.5 * base.pcie_ms / base.io_expert_ms  # half the experts the model moves
    m = Measurement(device="cuda:0", overlap=True, steps=20, step_ms=base.step_ms, cpu_ms=0.0,
                    copy_ms=moved * base.io_expert_ms * 1.5, stall_ms=0.0,
                    hit_rate=base.hit_rate, trace=trace, reads=moved)
    assert fit_calibration(predictor=model, measured=m).io_scale == pytest.approx(1.5)
    nothing = dataclasses.replace(m, copy_ms=0.0, reads=0.0)  # streamed: reads not timed
    assert fit_calibration(predictor=model, measured=nothing).io_scale == 1.0


# ---- the command --------------------------------------------------------------------------------


@pytest.fixture
def config_only(tmp_path):
    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_config("mini")))
    return folder


@pytest.fixture
def profile_json(tmp_path):
    return CONSUMER[0].save(tmp_path / "rtx3060.json")


def test_plan_command_json_from_a_config_only_folder(config_only, profile_json, capsys):
    code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(profile_json),
                            "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    for key in ("experts_per_layer", "tau", "cpu_threads", "predicted_step_ms", "breakdown"):
        assert key in obj
    assert set(obj["experts_per_layer"]) == {str(i) for i in MINI.moe_layers}
    assert obj["memory"]["used_bytes"] <= obj["memory"]["budget_bytes"]
    assert "predicted step" in err  # the table goes to stderr


def test_plan_command_errors_are_one_line(config_only, profile_json, capsys):
    code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(profile_json),
                            "--vram", "1"], capsys)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: --vram 1 GiB cannot hold") and lines[1].startswith("hint:")


def test_plain_plan_imports_no_torch(config_only, profile_json):
    code = ("import sys; from tidecli.cli import main\n"
            f"try:\n    main(['plan', '--model', {str(config_only)!r}, '--profile', "
            f"{str(profile_json)!r}, '--json'])\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tau"] >= 1


def test_engine_honours_per_layer_budgets(tiny_ckpt):
    from dataclasses import replace

    from tidecli.model.config import load_config
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    base = make_plan(config=load_config(tiny_ckpt), profile=CONSUMER[0], vram_gib=4)

    def opts(budgets):  # the engine follows a plan passed whole: these budgets, τ 2
        return replace(engine_options(model=str(tiny_ckpt), device="cpu", policy="tide"),
                       plan=replace(base, experts_per_layer=budgets, tau=2))

    budgets = {1: 3, 2: 5, 3: 7}
    eng = Engine(opts(budgets), quiet=True)
    try:
        assert eng.runtime.budgets == budgets
    finally:
        eng.close()
    with pytest.raises(TideError, match="do not fit this model"):
        Engine(opts({1: 3}), quiet=True)


def _calibrate_on_the_cpu(tiny_ckpt, tmp_path, capsys):
    """`tide plan --calibrate` of the tiny model with 12 of its 32 experts a layer on a GPU
    profile, run on the CPU: (exit code, stdout, stderr, config)."""
    import torch

    from tidecli.model.config import load_config

    cfg = load_config(tiny_ckpt)
    threads = torch.get_num_threads()  # the plan's threads are applied: keep torch's own
    prof = gpu_profile("test GPU", vram_gib=8, mem_gbps=500, h2d_gbps=20, cores=threads,
                       ram_gib=32, cpu_1tok_ms=0.05, gpu_expert_ms=0.02, threads=threads)
    path = prof.save(tmp_path / "p.json")
    fixed = device_dense_bytes(cfg) + cfg.kv_bytes_per_token() * 4096 + workspace_bytes(cfg, 32)
    vram = (fixed + cfg.num_moe_layers * 12 * cfg.expert_bytes() + 100) / GIB  # 12 of 32 a layer
    # a random model is never confident: a tiny threshold keeps the blocks to a few steps
    code, out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                            "--vram", repr(vram), "--calibrate", "--device", "cpu",
                            "--threshold", "1e-7", "--json"], capsys)
    return code, out, err, cfg


def test_calibration_warms_up_before_it_measures(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """As the bench does: one block decoded and dropped, then the measured blocks, the routing
    trace started after the warm-up."""
    from tidecli.runtime.engine import Engine

    seen = []
    real = Engine.decoder

    def spy(self, ids, settings):
        seen.append((settings.gen_length, self.runtime.trace is not None))
        return real(self, ids, settings)

    monkeypatch.setattr(Engine, "decoder", spy)
    code, _out, err, _cfg = _calibrate_on_the_cpu(tiny_ckpt, tmp_path, capsys)
    assert code == 0, err
    assert seen == [(32, False), (64, True)]
    # a line as each block ends: the warm-up's, then the measured ones, up to every token
    assert "warm-up: 32 of 32 tokens (" in err and "measuring: 64 of 64 tokens (" in err
    assert err.index("warm-up: ") < err.index("measuring: ")


def test_calibrate_runs_real_steps_on_the_cpu(tiny_ckpt, tmp_path, capsys):
    code, out, err, cfg = _calibrate_on_the_cpu(tiny_ckpt, tmp_path, capsys)
    assert code == 0, err
    obj = json.loads(out)
    cal = obj["calibration"]
    assert cal["measured"]["steps"] >= 2 and cal["measured"]["step_ms"] > 0
    assert cal["measured_plan"]["experts_per_layer"] == {str(i): 12 for i in cfg.moe_layers}
    # 12 of 32 experts resident, all in RAM on a GPU profile: the plan streams its misses,
    # and the run it measures does too (no CPU calls)
    assert obj["misses"] == "stream" and cal["measured"]["cpu_ms"] == 0
    assert cal["scales"]["overlap"] is False
    # the fitted scales reproduce what was measured, for the measured plan
    measured = cal["measured"]["step_ms"]
    assert cal["predicted_calibrated"]["step_ms"] == pytest.approx(measured, rel=0.25)
    assert obj["routing_source"] == "trace"
    assert sum(obj["experts_per_layer"].values()) <= cfg.num_moe_layers * 12
    assert "calibration on cpu" in err


def test_streamed_misses_plan_tau_one_and_no_cpu_work():
    """With every expert in RAM on a GPU, misses can be streamed: the τ program is the block's
    streamed reads (which only grow with τ), the breakdown has no CPU term, and the step is
    dense + resident experts + the missed experts' PCIe reads."""
    for prof in CONSUMER:
        if make_plan(config=MINI, profile=prof, vram_gib=12, misses="cpu").tiered:
            continue  # mini's 28.5 GiB of experts do not fit this machine's RAM
        plan = make_plan(config=MINI, profile=prof, vram_gib=12, misses="stream")
        assert plan.misses == "stream" and plan.to_dict()["misses"] == "stream"
        assert plan.tau == 1
        assert list(plan.tau_costs_ms) == sorted(plan.tau_costs_ms)
        bd = plan.breakdown
        assert bd.cpu_miss_ms == 0 and bd.cpu_stall_ms == 0 and bd.pcie_ms > 0
        assert bd.host_ms == 0
        assert plan.predicted_step_ms == pytest.approx(bd.gpu_dense_ms + bd.gpu_expert_ms
                                                       + bd.pcie_ms)
        _check_sane(plan, MINI)
    cpu = make_plan(config=MINI, profile=CONSUMER[-1], vram_gib=12, misses="cpu")
    assert cpu.misses == "cpu" and cpu.breakdown.cpu_miss_ms > 0


def test_a_disk_tier_plans_cpu_misses():
    plan = make_plan(config=FLASH, profile=CONSUMER[3], vram_gib=24, ram_gib=48)
    assert plan.tiered and plan.misses == "cpu"
    with pytest.raises(TideError, match="every expert in RAM"):
        make_plan(config=FLASH, profile=CONSUMER[3], vram_gib=24, ram_gib=48, misses="stream")


def test_plan_command_misses_choice(config_only, profile_json, tmp_path, capsys):
    big = CONSUMER[-1].save(tmp_path / "rtx5090.json")  # 192 GB of RAM: mini's experts fit
    plans = {}
    for misses in ("auto", "stream", "cpu"):
        code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(big),
                                "--vram", "10", "--misses", misses, "--json"], capsys)
        assert code == 0, err
        plans[misses] = json.loads(out)
    assert plans["auto"]["misses"] == plans["stream"]["misses"] == "stream"
    assert plans["cpu"]["misses"] == "cpu" and plans["cpu"]["breakdown"]["cpu_miss_ms"] > 0
    # one vocabulary for every command: the planner models every mode the runtime runs
    for misses in ("split", "gpu"):
        code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(big),
                               "--vram", "10", "--misses", misses, "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["misses"] == misses
    code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(profile_json),
                           "--misses", "nope"], capsys)
    assert code == 1 and err.startswith("error: unknown --misses")
    # 32 GB of RAM: mini's 28.5 GiB of experts get a disk tier, which cannot stream
    code, out, err = tide(["plan", "--model", str(config_only), "--profile", str(profile_json),
                            "--misses", "stream"], capsys)
    assert code == 1 and "every expert in RAM" in err


def test_host_driven_misses_pay_a_hand_off_per_moe_layer():
    """cpu, split and gpu misses hand every MoE layer to the host: the profile's measured
    hand-off is added once per MoE layer; streamed misses (one device program) never pay it.
    Without a measurement the plan says what it assumed."""
    from dataclasses import replace

    from tidecli.experts.modes import MissMode
    from tidecli.planner.costs import FALLBACK_HOST_LAYER_MS

    p = toy_problem()
    costs = replace(p.costs, host_layer_ms={"cpu": 0.3, "gpu": 0.5})
    for mode, each in ((MissMode.CPU, 0.3), (MissMode.SPLIT, 0.4), (MissMode.GPU, 0.5)):
        without = predict(replace(p, misses=mode), np.array([2, 2]), 2)
        bd = predict(replace(p, misses=mode, costs=costs), np.array([2, 2]), 2)
        assert bd.host_ms == pytest.approx(each * p.cfg.num_moe_layers)
        assert bd.step_ms == pytest.approx(without.step_ms + bd.host_ms)
    streamed = predict(replace(p, misses=MissMode.STREAM, costs=costs), np.array([2, 2]), 1)
    assert streamed.host_ms == 0.0

    prof = CONSUMER[3]
    assert not prof.host_layer_ms
    cpu = make_plan(config=MINI, profile=prof, vram_gib=12, misses="cpu")
    assert cpu.breakdown.host_ms == pytest.approx(FALLBACK_HOST_LAYER_MS["cpu"]
                                                  * MINI.num_moe_layers)
    assert any("hand-off" in n and "tide profile" in n for n in cpu.notes)
    assert any("predicted optimistically" in n and "--calibrate" in n for n in cpu.notes)
    stream = make_plan(config=MINI, profile=prof, vram_gib=12)
    assert stream.misses == "stream" and not any("hand-off" in n for n in stream.notes)
    assert not any("optimistically" in n for n in stream.notes)
    measured = make_plan(config=MINI, profile=replace(prof, host_layer_ms={"cpu": 0.5}),
                         vram_gib=12, misses="cpu")
    assert measured.breakdown.host_ms == pytest.approx(0.5 * MINI.num_moe_layers)
    assert not any("hand-off" in n for n in measured.notes)
    assert measured.predicted_step_ms > cpu.predicted_step_ms


def test_compiled_steps_plan_with_their_own_fixed_cost():
    """A plan for compiled steps (--compile on) counts the smaller fixed cost per layer, says
    so, and keeps it through the predictor; a calibrated fixed cost still wins."""
    from tidecli.hardware.store import resolve_profile
    from tidecli.planner.costs import LAUNCH_MS_PER_LAYER, LAUNCH_MS_PER_LAYER_COMPILED

    prof = resolve_profile("h200")
    eager = make_plan(config=MINI, profile=prof, vram_gib=10, workload=Workload())
    comp = make_plan(config=MINI, profile=prof, vram_gib=10, workload=Workload(compiled=True))
    layers = MINI.num_hidden_layers
    saved = (LAUNCH_MS_PER_LAYER - LAUNCH_MS_PER_LAYER_COMPILED) * layers
    assert comp.compiled and not eager.compiled and comp.to_dict()["compiled"] is True
    assert comp.breakdown.gpu_dense_ms == pytest.approx(eager.breakdown.gpu_dense_ms - saved)
    assert any("compiled steps" in n for n in comp.notes)
    assert not any("compiled steps" in n for n in eager.notes)
    again = predictor(plan=comp, config=MINI, profile=prof)(None)
    assert again.gpu_dense_ms == pytest.approx(comp.breakdown.gpu_dense_ms)
    cal = Calibration(launch_ms_per_layer=0.1)
    fixed = make_plan(config=MINI, profile=prof, vram_gib=10, workload=Workload(compiled=True),
                      calibration=cal)
    assert fixed.constants["launch_ms"] == pytest.approx(0.1 * layers)
    assert not any("compiled steps" in n for n in fixed.notes)


def test_a_profile_timed_uncaptured_says_its_expert_term_is_high():
    """Profiles measured before the expert call was timed as a CUDA graph counted the host's
    launch gaps as expert time: a plan from one says so; a captured one's expert time is used
    as measured (not replaced by an estimate)."""
    from dataclasses import replace

    from tidecli.hardware.store import resolve_profile
    from tidecli.planner.costs import hardware_costs

    captured = resolve_profile("h200")
    assert captured.gpu_expert_captured is True
    old = replace(captured, gpu_expert_captured=None)
    kw = dict(cfg=MINI, block_length=32, context_tokens=4096)
    new_costs = hardware_costs(profile=captured, **kw)
    old_costs = hardware_costs(profile=old, **kw)
    assert new_costs.gpu_expert_ms == pytest.approx(captured.gpu_expert_ms[32])
    assert not any("outside a CUDA graph" in n or "estimated" in n for n in new_costs.notes)
    assert any("outside a CUDA graph" in n for n in old_costs.notes)


def test_a_plan_for_more_cpus_than_this_machine_has_calibrates_with_those_it_has(
        tiny_ckpt, tmp_path, capsys):
    """A plan made with another machine's profile (16 threads) is calibrated here with the CPUs
    this process may use, and says so, instead of refusing the plan's thread count."""
    from tidecli.hardware.probe import usable_cores

    usable = usable_cores()
    prof = gpu_profile("big host", vram_gib=8, mem_gbps=500, h2d_gbps=20, cores=usable + 16,
                       ram_gib=32, cpu_1tok_ms=0.05, gpu_expert_ms=0.02, threads=usable + 16)
    path = prof.save(tmp_path / "p.json")
    code, out, err = tide(["plan", "--model", str(tiny_ckpt), "--profile", str(path),
                           "--vram", "0.2", "--calibrate", "--device", "cpu", "--misses", "cpu",
                           "--threshold", "1e-7", "--json"], capsys)
    assert code == 0, err
    obj = json.loads(out)
    assert obj["calibration"]["measured"]["steps"] >= 2
    assert any(f"calibrated with {usable} CPU threads" in w for w in obj["warnings"]), obj

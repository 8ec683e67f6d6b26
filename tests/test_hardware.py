"""Hardware room: probing, PCIe math, profile files, reference profiles, `tide profile`."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from tidecli.cli import main
from tidecli.errors import TideError
from tidecli.hardware import cpu_measure, gpu_measure, measure, probe, store, timing
from tidecli.hardware.profile import HardwareProfile, load_profile_file

REPO = Path(__file__).resolve().parents[1]
REFERENCE = ("rtx3060", "rtx4060ti", "rtx4070", "rtx4080", "rtx4090", "rtx5090")
MEASURED = ("h200",)  # profiles measured on a real machine, shipped as references
# small enough that a real CPU measurement takes well under a second
TINY = measure.MeasureSettings(cpu_tokens=(1, 8), cpu_jobs=2, cpu_repeats=1, ram_bytes=1 << 20)
TINY_SHAPE = (64, 32)


@pytest.fixture(autouse=True)
def _own_config_dir(tmp_path, monkeypatch):
    # conftest shares one config folder per session; saved profiles must not leak across tests
    monkeypatch.setenv("TIDE_CONFIG_DIR", str(tmp_path / "config"))


def _main(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _profile(**kw) -> HardwareProfile:
    base = dict(name="test box", gpu_name=None, expert_shape=(64, 32),
                gpu_expert_ms={1: 0.01, 32: 0.02}, cpu_expert_ms={1: {1: 0.5, 8: 0.9}},
                cpu_best_threads=1, cpu_variant_ms={"bf16/intra": 0.9},
                cpu_features=["avx2"], sources={"cpu_expert_ms": "measured"}, notes=["n"])
    base.update(kw)
    return HardwareProfile(**base)


# ---------------------------------------------------------------- probe


def test_probe_cpu_is_sane_on_this_machine():
    cpu = probe.probe_cpu()
    assert cpu.model
    assert 1 <= cpu.physical_cores <= cpu.logical_cores
    assert 0 < cpu.ram_available_bytes <= cpu.ram_total_bytes
    assert set(cpu.features) <= set(probe.CPU_FEATURES)
    if Path("/proc/cpuinfo").is_file():
        flags = probe._cpuinfo()[1]
        assert cpu.features == probe.cpu_features_from_flags(flags)


def test_cpu_features_from_flags_keeps_the_ones_that_matter():
    flags = "fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16 avx512vl".split()
    assert probe.cpu_features_from_flags(flags) == ["avx2", "avx512f", "avx512_bf16",
                                                    "amx_bf16", "amx_tile"]
    assert probe.cpu_features_from_flags([]) == []


def test_cpu_bf16_units_decide_the_cpu_dtype(monkeypatch):
    import torch

    from tidecli.runtime import devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(probe, "_cpuinfo", lambda: ("x", ["avx2", "avx512f", "avx512_bf16"]))
    monkeypatch.setattr(devices, "cpu_computes_bf16", probe.cpu_computes_bf16)
    assert devices.pick_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(probe, "_cpuinfo", lambda: ("x", ["avx2", "avx512f"]))
    assert devices.pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(probe, "_cpuinfo", lambda: ("", []))  # unreadable: the safe choice
    assert devices.pick_dtype("auto", cpu) == torch.float32
    assert devices.pick_dtype("fp16", cpu) == torch.float16  # explicit wins


def test_threads_leave_the_busy_cores_alone():
    assert probe.threads_for(8, 0.0) == 8
    assert probe.threads_for(8, 0.4) == 8  # noise is not a busy core
    assert probe.threads_for(8, 1.0) == 7
    assert probe.threads_for(2, 1.2) == 1
    assert probe.threads_for(2, 5.0) == 1  # never fewer than one
    assert 1 <= probe.free_cpu_threads(sample_s=0.01) <= probe.usable_cores()


def test_cpu_threads_come_from_the_option_then_the_environment(monkeypatch):
    import torch

    from tidecli.runtime import devices

    before = torch.get_num_threads()
    try:
        assert devices.set_cpu_threads(2) == 2  # --cpu-threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert devices.set_cpu_threads(0) == 1  # the user's OMP_NUM_THREADS is kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        monkeypatch.setattr(devices, "free_cpu_threads", lambda: 3)
        assert devices.set_cpu_threads(0) == 3  # else the free cores
    finally:
        torch.set_num_threads(before)


def test_pcie_peak_per_direction():
    assert probe.pcie_peak_gbps(3, 16) == pytest.approx(15.76)
    assert probe.pcie_peak_gbps(4, 16) == pytest.approx(31.504)
    assert probe.pcie_peak_gbps(4, 8) == pytest.approx(15.752)
    assert probe.pcie_peak_gbps(5, 16) == pytest.approx(63.008)
    assert probe.pcie_peak_gbps(None, 16) is None
    assert probe.pcie_peak_gbps(4, 0) is None
    assert probe.pcie_peak_gbps(9, 16) is None


def test_probe_gpu_without_or_with_broken_nvml_is_none(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert probe.probe_gpu() is None
    broken = types.SimpleNamespace(nvmlInit=lambda: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert probe.probe_gpu() is None


def _fake_nvml(calls: list[str]) -> types.SimpleNamespace:
    mem = types.SimpleNamespace(total=24 << 30, free=23 << 30)

    def by_uuid(uuid):
        calls.append(uuid)
        if uuid != "GPU-1234":
            raise RuntimeError("not found")
        return "h"

    return types.SimpleNamespace(
        nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByUUID=by_uuid, nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetName=lambda h: b"NVIDIA GeForce RTX 4090",
        nvmlDeviceGetMemoryInfo=lambda h: mem, nvmlSystemGetDriverVersion=lambda: "560.35",
        nvmlDeviceGetCurrPcieLinkGeneration=lambda h: 4,
        nvmlDeviceGetCurrPcieLinkWidth=lambda h: 16,
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 4,
        nvmlDeviceGetMaxPcieLinkWidth=lambda h: (_ for _ in ()).throw(RuntimeError("n/a")))


def test_probe_gpu_reads_nvml_and_matches_the_cuda_uuid(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(calls))
    facts = probe.probe_gpu(uuid="1234")
    assert facts is not None and facts.name == "NVIDIA GeForce RTX 4090"
    assert (facts.vram_total_bytes, facts.driver) == (24 << 30, "560.35")
    assert (facts.pcie_gen, facts.pcie_width, facts.pcie_width_max) == (4, 16, None)
    assert facts.pcie_peak_gbps == pytest.approx(31.504)
    assert "GPU-1234" in calls and calls[-1] == "shutdown"
    # several GPUs and no UUID match: unknown rather than another card's facts
    assert probe.probe_gpu(uuid="ffff") is None


# ---------------------------------------------------------------- saved profiles


def test_save_load_round_trip_is_atomic():
    prof = _profile()
    path = store.save_profile(prof)
    assert path.parent == store.profiles_dir()
    assert path.name == f"{store.machine_key(None)}.json"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert store.load_saved_profile() == prof
    assert load_profile_file(path).cpu_expert_ms == {1: {1: 0.5, 8: 0.9}}


def test_machine_key_is_a_safe_file_name():
    key = store.machine_key("NVIDIA GeForce RTX 4090", host="My Box.local")
    assert key == "my-box-local--nvidia-geforce-rtx-4090"
    assert store.machine_key(None, host="h") == "h--cpu"


def test_corrupt_saved_profile_is_a_one_line_error():
    path = store.saved_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ not json")
    for call in (store.load_saved_profile, lambda: store.resolve_profile(None),
                 lambda: store.load_or_create_profile(announce=print)):
        with pytest.raises(TideError) as info:
            call()
        assert "corrupt" in info.value.message and "\n" not in info.value.message
        assert info.value.hint
    path.write_text(json.dumps({"no": "name"}))
    with pytest.raises(TideError, match="corrupt"):
        store.load_saved_profile()


def test_resolve_profile_by_none_path_and_name(tmp_path):
    with pytest.raises(TideError, match="no hardware profile for this machine"):
        store.resolve_profile(None)
    prof = _profile()
    store.save_profile(prof)
    assert store.resolve_profile(None) == prof
    assert store.resolve_profile(store.machine_key(None)) == prof  # a saved key
    other = prof.save(tmp_path / "elsewhere.json")
    assert store.resolve_profile(str(other)) == prof
    assert store.resolve_profile("rtx4090").gpu_name == "NVIDIA GeForce RTX 4090"
    assert store.resolve_profile("RTX 4090").name == store.resolve_profile("rtx-4090").name
    with pytest.raises(TideError, match="no reference profile named") as info:
        store.resolve_profile("rtx9999")
    assert "rtx4090" in (info.value.hint or "")
    with pytest.raises(TideError, match="no profile at"):
        store.resolve_profile(str(tmp_path / "missing.json"))


def test_load_or_create_measures_once_then_reuses(monkeypatch):
    made = _profile(name="measured now")
    calls, said = [], []

    def fake_measure(**kw):
        calls.append(kw)
        return made

    monkeypatch.setattr(measure, "measure_profile", fake_measure)
    assert store.load_or_create_profile(announce=said.append) == made
    assert calls == [{"quick": True, "expert_shape": None, "progress": None}]
    assert said and said[0].startswith("no hardware profile for this machine yet")
    assert store.load_or_create_profile(announce=said.append) == made
    assert len(calls) == 1 and len(said) == 1


# ---------------------------------------------------------------- reference profiles


def test_reference_profiles_are_shipped_and_found():
    assert store.list_reference_profiles() == sorted(REFERENCE + MEASURED)
    found = store._reference_files()
    for name in REFERENCE + MEASURED:
        assert found[name].read_bytes() == (REPO / "profiles" / f"{name}.json").read_bytes()


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_profile_is_honest_and_sane(name):
    p = store.load_reference_profile(name)
    assert p.kind == "reference" and "(reference)" in p.name and p.notes
    assert set(p.sources.values()) <= {"spec", "estimated"}  # nothing claims "measured"
    numeric = ("vram_total_bytes", "pcie_peak_gbps", "gpu_mem_gbps", "gpu_mem_peak_gbps",
               "gpu_bf16_tflops", "gpu_bf16_peak_tflops", "h2d_pinned_gbps",
               "h2d_pinned_expert_gbps", "h2d_pageable_gbps", "h2d_pageable_expert_gbps",
               "d2h_pinned_gbps", "copy_latency_ms", "gpu_expert_ms", "cpu_expert_ms",
               "ram_read_gbps", "cpu_physical_cores", "ram_total_bytes")
    for field in numeric:
        assert getattr(p, field), field
        assert field in p.sources, field
    assert 8 << 30 <= p.vram_total_bytes <= 48 << 30
    assert p.vram_free_bytes < p.vram_total_bytes
    assert p.pcie_peak_gbps == probe.pcie_peak_gbps(p.pcie_gen, p.pcie_width)
    assert p.h2d_pageable_gbps < p.h2d_pinned_expert_gbps <= p.h2d_pinned_gbps < p.pcie_peak_gbps
    assert p.gpu_mem_gbps < p.gpu_mem_peak_gbps and p.gpu_bf16_tflops < p.gpu_bf16_peak_tflops
    assert p.expert_shape == (2048, 512)
    assert p.cpu_best_threads in p.cpu_expert_ms
    for curve in p.cpu_expert_ms.values():
        times = [curve[t] for t in sorted(curve)]
        assert times == sorted(times) and times[0] > 0  # more tokens never cost less
    assert 0 < min(p.gpu_expert_ms.values()) < min(p.cpu_expert_ms[p.cpu_best_threads].values())


def test_reference_links_match_the_cards():
    assert (store.load_reference_profile("rtx4060ti").pcie_width) == 8
    p5090 = store.load_reference_profile("rtx5090")
    assert (p5090.pcie_gen, p5090.pcie_width) == (5, 16)
    assert store.load_reference_profile("rtx4090").vram_total_bytes == 24 << 30


# ---------------------------------------------------------------- measurement (CPU, real)


def test_measure_cpu_experts_picks_a_measured_setup():
    ticks: list[str] = []
    res = cpu_measure.measure_cpu_experts(*TINY_SHAPE, cores=2, tokens=(1, 8), jobs=2, repeats=1,
                                      tick=ticks.append)
    assert set(res.variant_ms) == {"bf16/intra", "bf16/experts", "fp32/intra", "fp32/experts"}
    assert res.best_threads in (1, 2) and res.dtype in ("bf16", "fp32")
    assert set(res.expert_ms[res.best_threads]) == {1, 8}
    assert all(v > 0 for m in res.expert_ms.values() for v in m.values())
    assert len(ticks) == 4 + 1 + 1  # variants, the other thread count, the other token count


def test_thread_counts():
    assert cpu_measure.thread_counts(1) == [1]
    assert cpu_measure.thread_counts(2) == [1, 2]
    assert cpu_measure.thread_counts(12) == [1, 2, 4, 8, 12]
    assert cpu_measure.thread_counts(16) == [1, 2, 4, 8, 16]


def test_measure_profile_without_cuda_is_cpu_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen: list[tuple[str, int, int]] = []
    prof = measure.measure_profile(quick=True, expert_shape=TINY_SHAPE, settings=TINY,
                                   progress=lambda *a: seen.append(a))
    assert prof.kind == "measured" and prof.gpu_name is None and prof.h2d_pinned_gbps is None
    assert any("CPU-only" in n for n in prof.notes)
    assert prof.expert_shape == TINY_SHAPE and prof.ram_read_gbps > 0
    assert prof.sources["cpu_expert_ms"] == "measured" and "h2d_pinned_gbps" not in prof.sources
    dones = [d for _, d, _ in seen]
    assert dones == sorted(dones) and seen[-1][1] == seen[-1][2]
    assert len(seen) == seen[-1][2] + 1  # one report per step, then "done"
    assert HardwareProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


# ---------------------------------------------------------------- the command


@pytest.fixture
def small_quick(monkeypatch):
    monkeypatch.setattr(measure, "QUICK", TINY)
    monkeypatch.setattr(measure, "DEFAULT_EXPERT_SHAPE", TINY_SHAPE)


def test_cli_profile_quick_json_on_a_cpu_only_machine(small_quick, capsys):
    code, out, err = _main(["profile", "--quick", "--json"], capsys)
    assert code == 0, err
    prof = HardwareProfile.from_dict(json.loads(out))
    assert prof.kind == "measured" and prof.cpu_expert_ms and prof.cpu_best_threads
    if prof.gpu_name is None:
        assert "CPU-only" in err
    assert "saved to" in err and "CPU pick" in err
    assert store.load_saved_profile() == prof


def test_cli_profile_no_save_and_output(small_quick, capsys, tmp_path):
    target = tmp_path / "p.json"
    code, out, err = _main(["profile", "--quick", "--no-save", "--output", str(target)], capsys)
    assert code == 0, err
    assert out == ""  # the table is on stderr; stdout only carries --json
    assert load_profile_file(target).kind == "measured"
    assert store.load_saved_profile() is None


def test_cli_profile_model_uses_the_checkpoint_expert_shape(tiny_ckpt, capsys, monkeypatch):
    from tidecli.model.config import load_config

    got = {}

    def fake_measure(**kw):
        got.update(kw)
        return _profile()

    monkeypatch.setattr(measure, "measure_profile", fake_measure)
    code, _, err = _main(["profile", "--model", str(tiny_ckpt), "--no-save"], capsys)
    assert code == 0, err
    cfg = load_config(tiny_ckpt)
    assert got["quick"] is False
    assert got["expert_shape"] == (cfg.hidden_size, cfg.moe_intermediate_size)


def test_cli_profile_list(capsys):
    code, out, _ = _main(["profile", "--list"], capsys)
    assert code == 0
    for name in REFERENCE:
        assert name in out
    code, out, _ = _main(["profile", "--list", "--json"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == sorted(REFERENCE + MEASURED)


def test_profile_help_does_not_import_torch():
    code = ("import sys; from tidecli.cli import main\n"
            "try:\n    main(['profile', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout and "--list" in res.stdout


def test_settings_quick_is_lighter_than_full():
    q, f = measure.QUICK, measure.FULL
    assert q.large_copy_bytes <= f.large_copy_bytes and q.cpu_repeats < f.cpu_repeats
    assert not q.cpu_full_grid and f.cpu_full_grid
    assert replace(q, cpu_jobs=1).cpu_jobs == 1


# ---------------------------------------------------------------- GPU paths, without a GPU


def test_gpu_benchmarks_arithmetic_on_the_cpu(monkeypatch):
    """The GPU microbenchmarks run on CPU tensors with wall-clock timing: shapes, routing and
    the bytes/FLOP accounting are exercised here; CUDA events only on the GPU machine."""
    monkeypatch.setattr(gpu_measure, "median_cuda_ms", timing.median_wall_ms)
    assert gpu_measure.h2d_gbps(1 << 20, pinned=False, device="cpu", warmup=1, repeats=2) > 0
    assert gpu_measure.d2d_gbps(1 << 20, device="cpu", warmup=1, repeats=2) > 0
    assert gpu_measure.gemm_tflops(64, device="cpu", warmup=1, repeats=2) > 0
    seen = []
    ms, kernel, captured = gpu_measure.gpu_expert_ms(
        64, 32, device="cpu", tokens=(1, 4), pool_experts=16, top_k=4, warmup=1, repeats=2,
        on_tokens=seen.append)
    assert kernel == "loop" and not captured and set(ms) == {1, 4} and seen == [1, 4]
    assert min(ms.values()) > 0
    # a compressed format's experts, timed through the runtime's own path (its CPU reference
    # here, the dequantizing kernel on a GPU)
    for fmt in measure.COMPRESSED_FORMATS:
        ms, kernel, _ = gpu_measure.gpu_expert_ms(64, 32, device="cpu", tokens=(4,),
                                                  pool_experts=16, top_k=4, warmup=1, repeats=2,
                                                  fmt=fmt)
        assert kernel == "loop" and set(ms) == {4} and ms[4] > 0


def test_per_format_gpu_expert_times_round_trip():
    prof = HardwareProfile(name="x", kind="measured", gpu_expert_ms={32: 0.005},
                           gpu_expert_format_ms={"int4": {4: 0.004, 32: 0.006}})
    back = HardwareProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back == prof and back.gpu_expert_format_ms["int4"][32] == 0.006
    old = prof.to_dict()
    del old["gpu_expert_format_ms"]  # a profile written before formats were measured
    assert HardwareProfile.from_dict(old).gpu_expert_format_ms == {}


def test_measure_profile_gpu_orchestration_with_fakes(monkeypatch):
    import torch

    idle = probe.GpuFacts(name="Fake GPU", vram_total_bytes=16 << 30, vram_free_bytes=15 << 30,
                          driver="560.1", pcie_gen=1, pcie_width=16, pcie_gen_max=4,
                          pcie_width_max=16)
    loaded = replace(idle, pcie_gen=4)
    links = iter([idle, loaded])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(uuid="1234"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (15 << 30, 16 << 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Fake GPU")
    monkeypatch.setattr(probe, "probe_gpu", lambda **kw: next(links))
    monkeypatch.setattr(measure, "_release_cuda_memory", lambda: None)
    monkeypatch.setattr(measure, "h2d_gbps", lambda n, pinned, **kw: 25.0 if pinned else 12.0)
    monkeypatch.setattr(measure, "d2h_gbps", lambda n, **kw: 26.0)
    monkeypatch.setattr(measure, "copy_latency_ms", lambda **kw: 0.01)
    monkeypatch.setattr(measure, "d2d_gbps", lambda n, **kw: 900.0)

    def no_gemm(n, **kw):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED\nmore")

    monkeypatch.setattr(measure, "gemm_tflops", no_gemm)

    def fake_experts(h, i, *, tokens, on_tokens=None, fmt="bf16", **kw):
        if fmt != "bf16":  # the dequantizing kernel
            return {t: 0.02 for t in tokens}, "grouped_mm", True
        for t in tokens:
            on_tokens(t)
        return {t: 0.01 for t in tokens}, "loop", False

    monkeypatch.setattr(measure, "gpu_expert_ms", fake_experts)
    from tidecli.experts import qkernel
    monkeypatch.setattr(qkernel, "qkernel_available",
                        lambda device, dtype, fmt=None: fmt != "fp8")  # as before sm89
    seen = []
    prof = measure.measure_profile(quick=True, expert_shape=TINY_SHAPE, settings=TINY,
                                   progress=lambda *a: seen.append(a))
    assert prof.gpu_name == "Fake GPU" and prof.name.startswith("Fake GPU on ")
    assert (prof.pcie_gen, prof.pcie_width) == (4, 16)  # the link under load, not at idle
    assert prof.pcie_peak_gbps == pytest.approx(31.504) and prof.driver == "560.1"
    assert prof.h2d_pinned_gbps == 25.0 and prof.h2d_pageable_expert_gbps == 12.0
    assert prof.gpu_bf16_tflops is None and "gpu_bf16_tflops" not in prof.sources
    assert any(n.startswith("bf16 GEMM not measured (RuntimeError: CUBLAS") for n in prof.notes)
    assert prof.gpu_expert_ms == {1: 0.01, 2: 0.01, 4: 0.01, 8: 0.01, 16: 0.01, 32: 0.01}
    assert prof.gpu_expert_kernel == "loop" and prof.gpu_expert_captured is False
    assert any("outside a CUDA graph" in n for n in prof.notes)
    assert "gpu_expert_captured" not in prof.sources
    assert set(prof.gpu_expert_format_ms) == {"int8", "int4"}
    assert prof.gpu_expert_format_ms["int4"][32] == 0.02
    assert prof.sources["h2d_pinned_gbps"] == "measured"
    assert prof.sources["pcie_peak_gbps"] == "spec"
    assert [d for _, d, _ in seen] == list(range(len(seen) - 1)) + [seen[-1][2]]


def test_reference_profiles_ship_inside_the_package():
    """The build installs profiles/ (the one copy) as the package tidecli.profiles: setup.py
    lists the package, pyproject.toml maps it to the folder and ships its .json files."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["tidecli.profiles"] == "profiles"
    assert cfg["package-data"]["tidecli.profiles"] == ["*.json"]
    assert '"tidecli.profiles"' in (REPO / "setup.py").read_text()
    shown = sorted(p.stem for p in (REPO / "profiles").glob("*.json"))
    assert shown and shown == store.list_reference_profiles()


@pytest.mark.parametrize("name", MEASURED)
def test_measured_reference_profiles_say_so(name):
    p = store.load_reference_profile(name)
    assert p.kind == "measured" and "measured" in p.name
    assert p.h2d_pinned_gbps > 0 and p.gpu_mem_gbps > 0 and p.cpu_expert_ms


def test_the_host_hand_off_is_measured_on_a_tiny_model():
    """`tide profile`'s hand-off figure runs the real runtimes (resident, then host-driven with
    every expert in a slot) on a tiny synthetic model; a failure is a note, not a crash."""
    import math

    from tidecli.commands.profile import with_host_handoff
    from tidecli.hardware.profile import HardwareProfile
    from tidecli.runtime.handoff import measure_host_layer_ms

    ms = measure_host_layer_ms("cpu", gen_length=32)
    assert set(ms) == {"cpu", "gpu"}
    assert all(math.isfinite(v) and 0.0 <= v < 100.0 for v in ms.values())
    prof = with_host_handoff(HardwareProfile(name="cpu box"))
    assert set(prof.host_layer_ms) == {"cpu", "gpu"}
    assert prof.sources["host_layer_ms"] == "measured"
    again = HardwareProfile.from_dict(prof.to_dict())
    assert again.host_layer_ms == prof.host_layer_ms


def test_a_failed_hand_off_measurement_is_a_note(monkeypatch):
    from tidecli.commands.profile import with_host_handoff
    from tidecli.hardware.profile import HardwareProfile
    from tidecli.runtime import handoff

    def broken(*a, **k):
        raise RuntimeError("no room\nmore")
    monkeypatch.setattr(handoff, "measure_host_layer_ms", broken)
    prof = with_host_handoff(HardwareProfile(name="cpu box"))
    assert prof.host_layer_ms == {}
    assert prof.notes == ["host hand-off not measured (RuntimeError: no room)"]

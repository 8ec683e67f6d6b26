"""Helpers shared by the test modules (fixtures live in conftest.py).

Imported as `from helpers import ...`: pytest puts tests/ on sys.path (`pythonpath` in
pyproject.toml), under `pytest` and `python -m pytest` alike.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tidecli.cli import main
from tidecli.experts.policies import (
    LruPolicy,
    StaticPolicy,
    TideOptions,
    TidePolicy,
)
from tidecli.experts.trace import RoutingTrace
from tidecli.hardware.profile import HardwareProfile
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.planner import HardwareCosts, RoutingStats
from tidecli.planner.model import Problem
from tidecli.units import GIB

MASK, EOS = 156895, 156892

# ---- the CLI in-process: exit code, output and its one-line errors ------------------------------


def tide(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    cap = capsys.readouterr()
    return exit_info.value.code, cap.out, cap.err


def user_error(argv: list[str], capsys, message: str, *, contains: str = "",
               hint: str = "") -> str:
    """Run the CLI, expect exit 1 ending in `error: <message>...` + `hint: ...`; returns both."""
    code, out, err = tide(argv, capsys)
    assert code == 1, err
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert lines[-2].startswith(f"error: {message}"), err
    assert contains in lines[-2], err
    assert lines[-1].startswith("hint: ") and hint in lines[-1], err
    return "\n".join(lines[-2:])


def gen(model: Path, *extra: str) -> list[str]:
    return ["generate", "Hello", "-m", str(model), "--device", "cpu", "--gen-length", "4",
            *extra]


# ---- checkpoint folders -------------------------------------------------------------------------


def clone(src: Path, dst: Path, *, copy: tuple[str, ...] = ()) -> Path:
    """A checkpoint folder sharing `src`'s files (symlinks), with real copies of `copy` and of
    every small file, so those can be changed without touching the session fixture."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in copy and f.name.endswith(".safetensors"):
            try:
                (dst / f.name).symlink_to(f)
                continue
            except OSError:  # no symlinks here (Windows without the privilege): copy
                pass
        shutil.copyfile(f, dst / f.name)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


# ---- models and generations on the CPU ----------------------------------------------------------

PROMPT = list(range(3000, 3041))

POLICIES = {
    "lru": LruPolicy,
    "static": StaticPolicy,
    "tide": lambda: TidePolicy(TideOptions(tau=3)),
    "tide-stall": lambda: TidePolicy(TideOptions(tau=2, stall_refresh=True)),
    "tide-cold": lambda: TidePolicy(TideOptions(tau=4, warm_start=False)),
}


def load_model(path, *, dtype=torch.float32, runtime=None):
    """A model on the CPU with every expert resident (or the given runtime factory)."""
    from tidecli.experts.runtime import ResidentRuntime, load_expert_pools
    from tidecli.model.checkpoint import Checkpoint
    from tidecli.model.llada2 import LLaDA2Model
    from tidecli.model.loader import load_dense

    ckpt = Checkpoint.open(path)
    cpu = torch.device("cpu")
    weights = load_dense(ckpt, device=cpu, dtype=dtype)
    if runtime is None:
        pools = load_expert_pools(ckpt, device=cpu, dtype=dtype)
        rt = ResidentRuntime(ckpt.config, pools, device=cpu, dtype=dtype)
    else:
        rt = runtime(ckpt)
    return LLaDA2Model(ckpt.config, weights, rt, device=cpu, dtype=dtype), ckpt


def decode_cpu(model, *, program=False, **kw):
    """PROMPT decoded on the CPU (eager, or the step program); the decoder's result."""
    from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings

    model.use_program = program
    kw.setdefault("gen_length", 96)
    d = BlockDiffusionDecoder(model, PROMPT, DecodeSettings(**kw), mask_id=MASK, eos_ids={EOS},
                              device=torch.device("cpu"))
    for _ in d.steps():
        pass
    return d.result


def bench_runs(path, spec, *, device: str = "cpu") -> list[dict]:
    """The rows of a `tide bench` of `spec` (a BenchSpec) on the checkpoint at `path`."""
    from tidecli.bench.harness import Bench
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(path), device=device, policy="resident"), quiet=True)
    try:
        return Bench(eng, spec).run()["runs"]
    finally:
        eng.close()


def stream_runtime(factory, b, *, prefetch=False, prefetch_steps=False):
    """A runtime factory: streamed misses (experts/stream.py), `b` slots per layer, on the CPU
    (`prefetch`: reading each layer's guessed experts ahead; `prefetch_steps`: each step's,
    before it runs)."""
    from tidecli.experts.store import HostExpertStore
    from tidecli.experts.stream import StreamRuntime

    def make(ckpt):
        store = HostExpertStore(ckpt, pin=False)
        budgets = {layer: b for layer in ckpt.config.moe_layers}
        return StreamRuntime(ckpt.config, store, budgets, factory(), device=torch.device("cpu"),
                             dtype=torch.float32, prefetch=prefetch,
                             prefetch_steps=prefetch_steps)
    return make


def check_tables(rt):
    rt.sync_host_tables()
    for layer, pool in rt.pools.pools.items():
        store_rows = rt.store.layers[layer]
        seen = 0
        for s, e in enumerate(pool.expert_of_slot.tolist()):
            if e < 0:
                continue
            seen += 1
            assert pool.slot_of_expert[e] == s
            assert torch.equal(pool.buf[s].cpu(), store_rows[e].to(pool.buf.dtype))
        assert seen == int((pool.slot_of_expert >= 0).sum())
        assert seen <= pool.slots


# ---- models and generations on CUDA -------------------------------------------------------------


def cuda_model(path, runtime=None):
    from tidecli.experts.runtime import ResidentRuntime, load_expert_pools
    from tidecli.model.checkpoint import Checkpoint
    from tidecli.model.llada2 import LLaDA2Model
    from tidecli.model.loader import load_dense

    dev, dt = torch.device("cuda"), torch.bfloat16
    ckpt = Checkpoint.open(path)
    w = load_dense(ckpt, device=dev, dtype=dt, embed_device=torch.device("cpu"))
    rt = runtime(ckpt) if runtime else ResidentRuntime(
        ckpt.config, load_expert_pools(ckpt, device=dev, dtype=dt), device=dev, dtype=dt)
    return LLaDA2Model(ckpt.config, w, rt, device=dev, dtype=dt)


def decode_cuda(model, prompt, **kw):
    from tidecli.decode.diffusion import BlockDiffusionDecoder, DecodeSettings

    d = BlockDiffusionDecoder(model, prompt, DecodeSettings(**kw), mask_id=MASK, eos_ids={EOS},
                              device=torch.device("cuda"))
    for _ in d.steps():
        pass
    return d.result


def decode22(model, prompt, *, device: str = "cpu", **kw):
    """`prompt` decoded with Levenshtein editing (a tiny22 checkpoint's ids); the result."""
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.levenshtein import LevenshteinDecoder

    kw = {"decoding": "levenshtein", **kw}
    d = LevenshteinDecoder(model, prompt, DecodeSettings(**kw), mask_id=156895,
                           eos_ids={156892, 156900}, edit_ids=(156930, 156931),
                           device=torch.device(device))
    for _ in d.steps():
        pass
    return d.result


# ---- the planner: configs, profiles, problems and traces made by hand ---------------------------

MINI = config_from_dict(preset_config("mini"))
FLASH = config_from_dict(preset_config("flash"))
TINY = config_from_dict(preset_config("tiny"))


def gpu_profile(name, *, vram_gib, mem_gbps, h2d_gbps, cores, ram_gib, cpu_1tok_ms,
                gpu_expert_ms, threads=None) -> HardwareProfile:
    """A profile like `tide profile` writes, with public-spec figures for consumer cards."""
    threads = threads or cores
    cpu = {t: {1: cpu_1tok_ms * f, 4: cpu_1tok_ms * 1.2 * f, 32: cpu_1tok_ms * 1.9 * f,
               256: cpu_1tok_ms * 6 * f}
           for t, f in ((threads, 1.0), (max(1, threads // 2), 1.4))}
    return HardwareProfile(
        name=name, kind="reference", gpu_name=name, vram_total_bytes=int(vram_gib * GIB),
        gpu_mem_gbps=mem_gbps, h2d_pinned_gbps=h2d_gbps * 1.05, h2d_pinned_expert_gbps=h2d_gbps,
        copy_latency_ms=0.01, gpu_expert_ms={1: gpu_expert_ms * 0.7, 32: gpu_expert_ms,
                                             256: gpu_expert_ms * 3},
        cpu_expert_ms=cpu, cpu_best_threads=threads, cpu_physical_cores=cores,
        ram_total_bytes=int(ram_gib * GIB), ram_available_bytes=int(ram_gib * 0.8 * GIB),
        ram_read_gbps=60.0, expert_shape=(2048, 512))


def toy_problem(*, c_io=1.0, overlap=True) -> Problem:
    """2 layers × 4 experts, 8 pairs and 4 distinct experts per step, miss = 1 − B/4 at every
    age, drift 0.25, 2 tokens per missed call; one expert call on the CPU = 1 ms."""
    b = np.arange(5)
    miss = np.broadcast_to(1 - b / 4, (2, 4, 5)).copy()
    drift = np.broadcast_to(np.where(b > 0, 0.25, 0.0), (2, 5)).copy()
    stats = RoutingStats(source="published", pairs=8.0, distinct=np.array([4.0, 4.0]),
                         miss_pairs=miss, miss_experts=miss.copy(), drift=drift,
                         tokens_per_call=np.full((2, 5), 2.0))
    costs = HardwareCosts(c_io_ms=c_io, gpu_expert_ms=0.5, dense_ms=2.0, dense_read_ms=1.0,
                          launch_ms=1.0, cpu_threads=4, cpu_points=((1.0, 1.0), (4.0, 1.0)),
                          overlap=overlap)
    return Problem(cfg=TINY, costs=costs, stats=stats, steps=4)


def fifo_trace(*, layers, experts, distinct, turnover, blocks, steps, per_layer=None):
    """Each layer uses `distinct` experts per step, all equally; every step the `turnover` oldest
    leave and that many never-used ones join (first-in first-out): drift d = turnover/distinct
    and the miss share of a placement a steps old is a·turnover/distinct, exactly."""
    tr = RoutingTrace(layers, experts, list(range(1, layers + 1)))
    fresh = [0] * layers
    hot = []
    for j in range(layers):
        n = (per_layer or [distinct] * layers)[j]
        hot.append(list(range(n)))
        fresh[j] = n
    for b in range(blocks):
        for s in range(steps):
            counts = np.zeros((layers, experts), dtype=np.int64)
            for j in range(layers):
                counts[j, hot[j]] = 4
            tr.append(counts, kind="step", block=b, step=s, tokens=32)
            for j in range(layers):
                hot[j] = hot[j][turnover:] + [(fresh[j] + i) % experts for i in range(turnover)]
                fresh[j] += turnover
    return tr


def offload_runtime(factory, b):
    """A maker of CPU OffloadRuntimes with `b` slots per MoE layer and the policy `factory()`."""
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.store import HostExpertStore

    def make(ckpt):
        store = HostExpertStore(ckpt, pin=False)
        budgets = {layer: b for layer in ckpt.config.moe_layers}
        return OffloadRuntime(ckpt.config, store, budgets, factory(),
                              device=torch.device("cpu"), dtype=torch.float32)
    return make

"""CUDA paths: grouped kernels, pinned memory, copy streams. Skipped without a GPU."""

import pytest
import torch

from tidecli.experts.compute import (
    grouped_mm_available,
    grouped_rows,
    pool_views,
    run_grouped_loop,
    run_grouped_mm,
)
from tidecli.experts.pairsort import sort_pairs, sort_pairs_reference
from tidecli.model.parts import combine
from tidecli.model.program import StepPrograms
from tidecli.model.route_kernel import group_topk_kernel
from tidecli.model.router import group_topk_reference

from helpers import bench_runs, check_tables, cuda_model, decode_cuda

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_grouped_mm_matches_the_loop():
    if not grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs sm90 and a recent torch")
    h, i, e, t, k = 2048, 512, 64, 32, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = (torch.randn(e, 3 * h * i, device="cuda", generator=g) * 0.02).bfloat16()
    gate_up, down = pool_views(buf, h, i)
    x = torch.randn(t, h, device="cuda", generator=g).bfloat16()
    slots = torch.randint(0, e, (t * k,), device="cuda", generator=g)
    slots[::7] = -1  # some pairs skipped
    fast = run_grouped_mm(x, slots, gate_up, down, k)
    ref = torch.zeros_like(fast)
    run_grouped_loop(x, slots, gate_up, down, k, ref)
    assert _rel(fast, ref) < 1e-2
    assert torch.all(fast[slots < 0] == 0)
    w = torch.rand(t, k, device="cuda")
    assert _rel(combine(fast, w, torch.bfloat16), combine(ref, w, torch.bfloat16)) < 1e-2
    # the pair-sort kernel: the stable argsort's order, and bitwise the same expert rows
    got, want = sort_pairs(slots, e, k), sort_pairs_reference(slots, e, k)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    slow = torch.zeros((t * k + 1, h), dtype=x.dtype, device="cuda")
    grouped_rows(x, *want, gate_up, down, slow)
    assert torch.equal(fast, slow[:-1])


def test_route_kernel_matches_the_reference_on_the_gpu():
    g = torch.Generator(device="cuda").manual_seed(1)
    choice = torch.rand(64, 256, device="cuda", generator=g)
    choice[0, :100] = 0.5  # ties
    for n_group, topk_group in [(8, 4), (1, 1)]:
        got = group_topk_kernel(choice, n_group, topk_group, 8)
        assert torch.equal(got, group_topk_reference(choice, n_group, topk_group, 8))
        assert torch.equal(torch.ops.tide.group_topk(choice, n_group, topk_group, 8), got)


def _offload(policy_factory, b):
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.store import HostExpertStore

    def make(ckpt):
        store = HostExpertStore(ckpt, pin=True)
        assert store.info.pinned
        return OffloadRuntime(ckpt.config, store, {layer: b for layer in ckpt.config.moe_layers},
                              policy_factory(), device=torch.device("cuda"),
                              dtype=torch.bfloat16)
    return make


@pytest.mark.parametrize("b", [4, 12])
def test_policies_are_token_identical_on_cuda(tiny_ckpt, b):
    from tidecli.experts.policies import LruPolicy, StaticPolicy, TideOptions, TidePolicy

    prompt = list(range(2000, 2045))
    ref = decode_cuda(cuda_model(tiny_ckpt), prompt, gen_length=96)
    for factory in (LruPolicy, StaticPolicy, lambda: TidePolicy(TideOptions(tau=3)),
                    lambda: TidePolicy(TideOptions(tau=2, stall_refresh=True))):
        model = cuda_model(tiny_ckpt, _offload(factory, b))
        out = decode_cuda(model, prompt, gen_length=96)
        s = model.experts.run_stats.summary()
        assert out.token_ids == ref.token_ids, (model.experts.name, b)
        assert s["gpu_hits"] + s["fetched_calls"] + s["cpu_calls"] == s["pairs"]
        model.experts.close()


def test_cpu_misses_keep_logits_within_bf16_rounding(tiny_ckpt):
    from tidecli.experts.policies import StaticPolicy
    from tidecli.model.llada2 import ForwardInfo, KVCache

    full = cuda_model(tiny_ckpt)
    part = cuda_model(tiny_ckpt, _offload(StaticPolicy, 6))
    x = torch.randint(0, 150000, (64,), device="cuda")
    out = []
    for m in (full, part):
        cache = KVCache(m.cfg, 64, device=torch.device("cuda"), dtype=torch.bfloat16)
        m.prefill(x[:32], cache, ForwardInfo("prefill"))
        out.append(m.block_forward(x[32:], 32, cache, ForwardInfo("step")))
    assert part.experts.run_stats.summary()["cpu_calls"] > 0
    assert _rel(out[1], out[0]) < 2e-2


def test_pinned_store_and_async_promotion_bandwidth(tiny_ckpt):
    """A promotion is one copy from pinned memory on the copy stream."""
    from tidecli.experts.store import HostExpertStore
    from tidecli.model.checkpoint import Checkpoint

    store = HostExpertStore(Checkpoint.open(tiny_ckpt), pin=True)
    row = store.expert(1, 0)
    assert row.is_pinned() and row.is_contiguous()


def _factory(policy):
    from tidecli.experts.policies import LruPolicy, StaticPolicy, TideOptions, TidePolicy

    return {"resident": None, "lru": _offload(LruPolicy, 6),
            "static": _offload(StaticPolicy, 6),
            "tide": _offload(lambda: TidePolicy(TideOptions(tau=3)), 6)}[policy]


def _program_tokens(policy, path, *, capture):
    m = cuda_model(path, _factory(policy))
    m = StepPrograms(m, capture=capture)
    prompt = list(range(2000, 2045))
    out = [decode_cuda(m, prompt, gen_length=96).token_ids for _ in range(2)]  # replayed twice
    assert out[0] == out[1]
    if capture:
        assert m._programs and all(p.graphs for p in m._programs.values())
    return out[0]


def test_step_program_on_cuda_every_policy_gives_the_resident_tokens(tiny_ckpt):
    """What generate runs on a GPU: the step program, captured as CUDA graphs. Every policy,
    graphs on or off, gives the same tokens as the resident run."""
    ref = _program_tokens("resident", tiny_ckpt, capture=True)
    assert _program_tokens("resident", tiny_ckpt, capture=False) == ref
    for policy in ("lru", "static", "tide"):
        for capture in (True, False):
            assert _program_tokens(policy, tiny_ckpt, capture=capture) == ref, (policy, capture)


def test_step_program_logits_match_the_eager_path_within_bf16(tiny_ckpt):
    """The program attends over the whole fixed-size cache with a mask (static shapes), the
    eager path over the filled prefix: the same math, rounded differently in bf16."""
    from tidecli.model.llada2 import ForwardInfo

    m = cuda_model(tiny_ckpt)
    x = torch.randint(0, 150000, (64,), device="cuda")
    cache = m.cache_for(64)
    m.prefill(x[:32], cache, ForwardInfo("prefill"))
    eager = m.block_forward(x[32:], 32, cache, ForwardInfo("step")).clone()
    prog = StepPrograms(m).block_forward(x[32:], 32, cache, ForwardInfo("step"),
                           ids_host=x[32:].tolist()).clone()
    assert _rel(prog, eager) < 2e-2


def test_synthetic_routing_replays_in_graphs(tiny_ckpt):
    from tidecli.bench.synthetic import SyntheticRouting

    prompt = list(range(2000, 2045))
    outs = []
    for program in (False, True):
        m = cuda_model(tiny_ckpt)
        m.router = SyntheticRouting(m.cfg, device=torch.device("cuda"))
        m = StepPrograms(m) if program else m
        outs.append(decode_cuda(m, prompt, gen_length=64).token_ids)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("policy", ["static", "tide"])
def test_misses_on_the_gpu_are_bitwise_exact(tiny_ckpt, policy):
    """misses=gpu: experts missing from the placement are computed by the same kernel as the
    resident ones (through scratch slots), so tokens equal the resident run's."""
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.policies import StaticPolicy, TideOptions, TidePolicy
    from tidecli.experts.store import HostExpertStore

    factory = StaticPolicy if policy == "static" else (lambda: TidePolicy(TideOptions(tau=3)))

    def make(ckpt):
        return OffloadRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                              {layer: 6 for layer in ckpt.config.moe_layers}, factory(),
                              device=torch.device("cuda"), dtype=torch.bfloat16, misses="gpu",
                              scratch_slots=4)

    ref = _program_tokens("resident", tiny_ckpt, capture=True)
    m = cuda_model(tiny_ckpt, make)
    m = StepPrograms(m)
    assert decode_cuda(m, list(range(2000, 2045)), gen_length=96).token_ids == ref
    s = m.experts.run_stats.summary()
    assert s["cpu_calls"] == 0
    # the misses' reads into scratch slots are timed with the copies (what calibration reads)
    assert s["fetched_calls"] > 0 and s["copy_ms"] > 0


def test_the_profile_times_the_experts_captured_as_the_step_runs_them():
    """`tide profile` replays the layer's expert call as a CUDA graph (no host launch gaps);
    the uncaptured timing stays available for comparison."""
    from tidecli.hardware.gpu_measure import gpu_expert_ms

    ms, kernel, captured = gpu_expert_ms(256, 128, device="cuda", tokens=(4, 32),
                                         pool_experts=16, top_k=4, warmup=1, repeats=3)
    assert captured and set(ms) == {4, 32} and min(ms.values()) > 0
    ms2, _, captured2 = gpu_expert_ms(256, 128, device="cuda", tokens=(4,), pool_experts=16,
                                      top_k=4, warmup=1, repeats=3, captured=False)
    assert not captured2 and ms2[4] > 0


def test_device_view_reads_pinned_memory_and_gathers_rows():
    from tidecli.experts.gather import copy_rows, device_view, stream_available

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    host = torch.randn(16, 6144).bfloat16().pin_memory()
    view = device_view(host, torch.device("cuda"))
    assert view.is_cuda and view.shape == host.shape and view.dtype == host.dtype
    assert torch.equal(view[3].cpu(), host[3])
    dst = torch.zeros(4, 6144, dtype=torch.bfloat16, device="cuda")
    src_idx = torch.tensor([7, -1, 2, -1], device="cuda")
    copy_rows(view, src_idx, dst, torch.tensor([1, 0, 3, 2], device="cuda"))
    assert torch.equal(dst[1].cpu(), host[7]) and torch.equal(dst[3].cpu(), host[2])
    assert not dst[0].any() and not dst[2].any()


@pytest.mark.parametrize("b,fused,through", [(0, True, True), (6, True, True), (6, True, False),
                                             (6, False, False)])
def test_streamed_misses_are_bitwise_exact(tiny_ckpt, b, fused, through):
    """misses=stream: the step never leaves the GPU (one graph), experts missing from the slots
    are gathered into them or read from pinned RAM by the same kernel: resident's tokens. With
    `through` (the default) a placed expert is written into its slot by the pass that reads it;
    the slots then hold exactly the store's rows."""
    from tidecli.experts.gather import stream_available
    from tidecli.experts.policies import StaticPolicy, TideOptions, TidePolicy
    from tidecli.experts.store import HostExpertStore
    from tidecli.experts.stream import StreamRuntime

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    ref = _program_tokens("resident", tiny_ckpt, capture=True)
    for factory in (StaticPolicy, lambda: TidePolicy(TideOptions(tau=1)),
                    lambda: TidePolicy(TideOptions(tau=3))):
        for capture in (True, False):
            def make(ckpt, factory=factory):
                rt = StreamRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                                   {layer: b for layer in ckpt.config.moe_layers}, factory(),
                                   device=torch.device("cuda"), dtype=torch.bfloat16)
                assert rt.fused and rt.through  # Triton ships with PyTorch's CUDA wheels
                rt.fused = fused  # False: the torch reference path
                rt.through = through
                return rt

            m = cuda_model(tiny_ckpt, make)
            m = StepPrograms(m, capture=capture)
            out = [decode_cuda(m, list(range(2000, 2045)), gen_length=96).token_ids
                   for _ in range(2)]
            assert out[0] == out[1] == ref, (m.experts.name, capture)
            if capture:
                assert all(len(p.graphs) == 1 for p in m._programs.values())  # one per step
            assert bool(m.experts._plans) == fused
            s = m.experts.run_stats.summary()
            assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
            check_tables(m.experts)
            m.experts.close()


def test_capturing_again_does_not_grow_device_memory(tiny_ckpt):
    """Programs are captured again for a new runtime (every `tide bench` run) or a reset; each
    capture used to warm up on a new stream, and cuBLAS keeps a workspace per stream for good,
    so the allocation grew by one workspace per capture."""
    from dataclasses import replace

    from tidecli.decode.settings import DecodeSettings
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny_ckpt), device="cuda", policy="tide", tau=1,
                                experts_per_layer=8, misses="gpu"), quiet=True)
    try:
        ids = eng.prompt_ids("Say something.")

        def run():
            for _ in eng.decoder(ids, DecodeSettings(gen_length=32)).steps():
                pass
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()

        run()
        first = run()
        for n in range(4):
            eng.set_runtime(residency=replace(eng.opts.residency,
                                              misses=("gpu", "cpu")[n % 2]))
            eng.reset_programs()
            after = run()
        assert after - first < 4 << 20, (first, after)
    finally:
        eng.close()


@pytest.mark.parametrize("fused", [True, False])
def test_read_ahead_is_bitwise_exact(tiny_ckpt, fused):
    """--prefetch layer: each layer's guessed experts are placed on a side stream inside the
    step's graph while the layer before computes; tokens stay the resident run's, and the
    side stream is joined before the layer's experts run (a missing join would race)."""
    from tidecli.experts.gather import stream_available
    from tidecli.experts.policies import TideOptions, TidePolicy
    from tidecli.experts.store import HostExpertStore
    from tidecli.experts.stream import StreamRuntime

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    ref = _program_tokens("resident", tiny_ckpt, capture=True)
    for capture in (True, False):
        def make(ckpt):
            rt = StreamRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                               {layer: 6 for layer in ckpt.config.moe_layers},
                               TidePolicy(TideOptions(tau=1)), device=torch.device("cuda"),
                               dtype=torch.bfloat16, prefetch=True)
            rt.fused = fused
            return rt

        m = StepPrograms(cuda_model(tiny_ckpt, make), capture=capture)
        out = [decode_cuda(m, list(range(2000, 2045)), gen_length=96).token_ids
               for _ in range(2)]
        assert out[0] == out[1] == ref, capture
        assert bool(m.experts.layer_ahead.plans) == fused
        s = m.experts.run_stats.summary()
        assert s["prefetched"] > 0 and 0 <= s["prefetch_used"] <= s["prefetched"]
        assert s["gpu_hits"] + s["fetched_calls"] == s["pairs"]
        m.experts.close()


def test_a_set_guess_reads_ahead_in_the_captured_step(tiny_ckpt):
    """`tide bench --guess-accuracy` on the GPU: the captured step reads the workload's guess
    from its fixed buffer; a right guess is always used, and every run gives the resident
    run's tokens."""
    from tidecli.bench.spec import BenchSpec
    from tidecli.experts.gather import stream_available

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["resident", "tide"], experts=[6], workloads=["drifting"], taus=[1],
        misses=["stream"], prefetch=["layer"], guesses=[1.0, 0.0], prompts=["Hello there"],
        gen_length=64, warmup_tokens=32), device="cuda")
    assert [r.get("guess_accuracy") for r in runs] == [None, 1.0, 0.0]
    assert all(r.get("identical") for r in runs[1:]), runs
    assert runs[1]["prefetch_accuracy"] == 1.0 and runs[1]["prefetched"] > 0
    # wrong guesses are seldom used: the gate turns the read-ahead off (during the warm-up)
    assert (runs[2]["prefetch_accuracy"] or 0.0) < 0.5 and runs[2]["prefetch_off_forwards"] > 0


def test_a_step_read_ahead_copies_on_the_copy_engine_and_keeps_the_tokens(tiny_ckpt):
    """--prefetch step on the GPU: the guessed experts cross PCIe on the copy stream before the
    captured step runs, each layer waiting on its own event inside the graph; guessed from the
    step before (the model's ranks, the drifting workload's) or set; a right guess is always
    used, and every run gives the resident run's tokens (a layer that did not wait would read
    rows still arriving)."""
    from tidecli.bench.spec import BenchSpec
    from tidecli.experts.gather import stream_available

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    runs = bench_runs(tiny_ckpt, BenchSpec(
        policies=["resident", "tide"], experts=[6], workloads=["model", "drifting"],
        taus=[1, 2], misses=["stream"], prefetch=["off", "step"], guesses=[1.0, 0.5],
        prompts=["Hello there"], gen_length=64, warmup_tokens=32), device="cuda")
    drift = [r for r in runs if r["workload"] == "drifting"]
    assert [(r.get("tau"), r.get("prefetch"), r.get("guess_accuracy")) for r in drift] == [
        (None, None, None), (1, "off", None), (1, "step", None), (1, "step", 1.0),
        (1, "step", 0.5), (2, "off", None), (2, "step", None), (2, "step", 1.0),
        (2, "step", 0.5)]
    assert all(r.get("identical") for r in runs if r["policy"] != "resident"), runs
    for r in (drift[3], drift[7]):
        assert r["prefetch_accuracy"] == 1.0 and r["prefetched"] > 0
    assert drift[3]["step_hit_rate"] > drift[1]["step_hit_rate"]
    assert drift[2]["prefetched"] > 0  # the workload's ranks at the step before

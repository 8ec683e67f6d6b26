"""Compressed experts in every runtime on the CPU device: with the same compressed store, every
policy and miss path (slots, CPU workers, scratch slots, streamed rows, the disk tier over the
cache) gives exactly the tokens of the all-resident run, since all of them dequantize with the
same reference and multiply in fp32."""

from __future__ import annotations

import pytest
import torch

from tidecli.experts.formats import COMPRESSED, expert_format
from tidecli.experts.offload import OffloadRuntime
from tidecli.experts.policies import LruPolicy, StaticPolicy, TideOptions, TidePolicy
from tidecli.experts.qcache import ensure_cache
from tidecli.experts.qstore import CompressedHostStore, CompressedTieredStore, load_compressed_pools
from tidecli.experts.runtime import ResidentRuntime
from tidecli.experts.stream import StreamRuntime
from tidecli.memory import host_tiers

from helpers import decode_cpu, load_model

CPU = torch.device("cpu")
GEN = 64


def _fmt(ckpt, name):
    cfg = ckpt.config
    return expert_format(name, hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size)


def resident(name):
    def make(ckpt):
        fmt = _fmt(ckpt, name)
        pools = load_compressed_pools(ckpt, fmt, device=CPU)
        return ResidentRuntime(ckpt.config, pools, device=CPU, dtype=torch.float32, fmt=fmt)
    return make


def pooled(name, policy, b, *, misses="cpu", stream=False, ram=None, keep=None):
    def make(ckpt):
        fmt = _fmt(ckpt, name)
        cfg = ckpt.config
        if ram is None:
            store = CompressedHostStore(ckpt, fmt, pin=False, device=CPU)
        else:  # the disk tier: `ram` experts in RAM, the rest read from the cache file
            cache = ensure_cache(ckpt, fmt, device=CPU, progress=None, notices=[])
            host = host_tiers(cfg, ram * fmt.row_bytes, expert_bytes=fmt.row_bytes)
            store = CompressedTieredStore(ckpt, fmt, cache, host, pin=False)
        if keep is not None:
            keep.append(store)
        budgets = {layer: b for layer in cfg.moe_layers}
        if stream:
            return StreamRuntime(cfg, store, budgets, policy(), device=CPU, dtype=torch.float32)
        return OffloadRuntime(cfg, store, budgets, policy(), device=CPU, dtype=torch.float32,
                              misses=misses)
    return make


@pytest.fixture(scope="module")
def references(tiny_ckpt):
    out = {}
    for name in COMPRESSED:
        model, _ = load_model(tiny_ckpt, runtime=resident(name))
        out[name] = decode_cpu(model, gen_length=GEN).token_ids
    return out


CASES = {
    "lru": lambda n: pooled(n, LruPolicy, 3),
    "static-cpu": lambda n: pooled(n, StaticPolicy, 3),
    "tide-cpu": lambda n: pooled(n, lambda: TidePolicy(TideOptions(tau=3)), 12),
    "tide-gpu-scratch": lambda n: pooled(n, lambda: TidePolicy(TideOptions(tau=2)), 3,
                                         misses="gpu"),
    "tide-stream": lambda n: pooled(n, lambda: TidePolicy(TideOptions(tau=1)), 3, stream=True),
    "static-stream": lambda n: pooled(n, StaticPolicy, 12, stream=True),
    "tide-disk": lambda n: pooled(n, lambda: TidePolicy(TideOptions(tau=3)), 5, ram=20),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", COMPRESSED)
def test_every_policy_gives_the_resident_tokens_of_the_same_store(tiny_ckpt, references, name,
                                                                  case):
    model, ckpt = load_model(tiny_ckpt, runtime=CASES[case](name))
    rt = model.experts
    assert decode_cpu(model, gen_length=GEN).token_ids == references[name]
    fmt = _fmt(ckpt, name)
    pool = next(iter(rt.pools.pools.values()))
    assert pool.buf.dtype == torch.uint8 and pool.buf.shape[1] == fmt.row_bytes
    s = rt.run_stats.summary()
    assert s["gpu_hits"] + s["fetched_calls"] + s["cpu_calls"] == s["pairs"]
    if s["promotions"]:  # what moves is the compressed bytes
        assert s["bytes_h2d"] % fmt.row_bytes == 0
    if case == "tide-disk":
        assert s["disk_reads"] > 0 and s["bytes_disk"] == s["disk_reads"] * fmt.row_bytes
    assert rt.describe().experts_format == name
    rt.close()


def test_compressed_tokens_differ_from_bf16_only_by_the_quantization(tiny_ckpt, references):
    """int8 is close enough on the tiny model to keep most tokens; the bf16 run is unchanged."""
    model, _ = load_model(tiny_ckpt)
    bf16 = decode_cpu(model, gen_length=GEN).token_ids
    same = sum(a == b for a, b in zip(bf16, references["int8"], strict=False))
    assert same >= len(bf16) // 2


@pytest.mark.parametrize("cap,dtype,plain,want", [
    ((9, 0), torch.bfloat16, True, "grouped_mm"),
    ((8, 6), torch.bfloat16, True, "grouped_mm"),   # Ampere: the plain Triton pass
    ((8, 6), torch.bfloat16, False, "loop"),        # ... switched off, torch._grouped_mm needs sm90
    ((7, 5), torch.bfloat16, True, "loop"),         # Triton's bf16 dot needs sm80
    ((7, 5), torch.float16, True, "grouped_mm"),
    ((9, 0), torch.float32, True, "loop"),
])
def test_the_expert_kernel_auto_follows_where_a_grouped_pass_runs(monkeypatch, cap, dtype, plain,
                                                                  want):
    """`auto` picks the grouped path wherever the fused Triton pass or torch._grouped_mm runs
    (here a GPU of each compute capability is pretended; no kernel is launched)."""
    from tidecli.experts import compute, qkernel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(qkernel, "triton_importable", lambda: True)
    monkeypatch.setattr(qkernel, "PLAIN", plain)
    qkernel._plain_ok.cache_clear()
    try:
        assert compute.pick_kernel("auto", torch.device("cuda"), dtype) == want
        assert compute.pick_kernel("loop", torch.device("cuda"), dtype) == "loop"
    finally:
        qkernel._plain_ok.cache_clear()

"""LLaDA2.2 on CUDA: block routing on the device and inside captured step programs, and every
policy computing its experts with the GPU kernel gives the resident run's tokens under
Levenshtein decoding. Skipped without a GPU."""

import pytest
import torch

from tidecli.model.program import StepPrograms

import helpers
from helpers import cuda_model

pytestmark = pytest.mark.gpu

PROMPT = list(range(2000, 2045))


def decode22(model, **kw):
    kw.setdefault("gen_length", 96)
    return helpers.decode22(model, PROMPT, device="cuda", **kw).token_ids


def test_block_routing_on_the_device_matches_the_reference_loop():
    from tidecli.model.config import config_from_dict
    from tidecli.model.presets import preset_config
    from tidecli.model.router import block_choice, block_route_reference

    cfg = config_from_dict(preset_config("flash22"))
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (32, 64, 45):
        scores = torch.rand(t, 256, device="cuda", generator=g)
        bias = torch.randn(256, device="cuda", generator=g) * 0.01
        ids = block_choice(scores + bias, capacity=48, window=32, k=8)
        ref, _ = block_route_reference(scores.cpu(), bias.cpu(), cfg)
        assert torch.equal(ids.cpu(), ref)


def test_block_routing_replays_in_a_captured_step(tiny22_ckpt):
    """The resident step program, graphs on and off, against the eager path."""
    eager = decode22(cuda_model(tiny22_ckpt))
    for capture in (True, False):
        m = StepPrograms(cuda_model(tiny22_ckpt), capture=capture)
        assert [decode22(m) for _ in range(2)] == [eager, eager], capture


@pytest.mark.parametrize("b", [4, 8, 12])  # below, at and above tiny22's pool of 8
def test_kernel_policies_are_bitwise_the_resident_run(tiny22_ckpt, b):
    from tidecli.experts.gather import stream_available
    from tidecli.experts.offload import OffloadRuntime
    from tidecli.experts.policies import LruPolicy, TideOptions, TidePolicy
    from tidecli.experts.store import HostExpertStore
    from tidecli.experts.stream import StreamRuntime

    if stream_available(torch.device("cuda")):
        pytest.skip(stream_available(torch.device("cuda")))
    ref = decode22(StepPrograms(cuda_model(tiny22_ckpt)))

    def lru(ckpt):
        return OffloadRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                              {layer: b for layer in ckpt.config.moe_layers}, LruPolicy(),
                              device=torch.device("cuda"), dtype=torch.bfloat16)

    def tide(ckpt):
        return StreamRuntime(ckpt.config, HostExpertStore(ckpt, pin=True),
                             {layer: b for layer in ckpt.config.moe_layers},
                             TidePolicy(TideOptions(tau=4), pool_experts=8),
                             device=torch.device("cuda"), dtype=torch.bfloat16)

    for make in (lru, tide):
        m = StepPrograms(cuda_model(tiny22_ckpt, make))
        assert decode22(m) == ref, make.__name__
        m.experts.close()

import torch

from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.model.router import route
from tidecli.model.weights import RouterWeights


def _cfg(**kw):
    raw = preset_config("tiny")
    raw.update({"num_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                "routed_scaling_factor": 2.5, **kw})
    return config_from_dict(raw)


def test_router_hand_computed_case():
    """Logits chosen so that the bias changes the choice, groups limit it, and the weights use
    the unbiased scores."""
    cfg = _cfg()
    # identity weight: the logits are the input itself
    x = torch.tensor([[2.0, 1.0, -1.0, 3.0, 0.0, 0.5, -2.0, 1.5]])
    w = RouterWeights(weight=torch.eye(8), expert_bias=torch.tensor(
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0]))
    ids, weights = route(x, w, cfg)
    s = torch.sigmoid(x[0])
    choice = s + w.expert_bias
    # groups of 2: sums of top-2 per group
    g = [choice[0] + choice[1], choice[2] + choice[3], choice[4] + choice[5], choice[6] + choice[7]]
    # group 3 (experts 6, 7) wins because of the bias on expert 6; group 0 is second
    assert sorted(torch.tensor(g).topk(2).indices.tolist()) == [0, 3]
    # best two of experts {0, 1, 6, 7} by biased score: 6 (bias) then 0
    assert ids[0].tolist() == [6, 0]
    expected = torch.stack([s[6], s[0]])
    expected = expected / expected.sum() * 2.5
    assert torch.allclose(weights[0], expected)
    # expert 3 has the highest unbiased score but sits in a dropped group
    assert 3 not in ids[0].tolist()


def test_router_is_fp32_whatever_the_input_dtype():
    cfg = _cfg()
    torch.manual_seed(0)
    w = RouterWeights(weight=torch.randn(8, 8), expert_bias=torch.zeros(8))
    x = torch.randn(5, 8).to(torch.bfloat16)
    ids, weights = route(x, w, cfg)
    assert weights.dtype == torch.float32 and ids.shape == (5, 2)
    assert torch.allclose(weights.sum(-1), torch.full((5,), 2.5))
    ids32, _ = route(x.float(), w, cfg)
    assert torch.equal(ids, ids32)

import json

import pytest

from tidecli.errors import TideError
from tidecli.model.config import config_from_dict, load_config
from tidecli.model.presets import preset_config


def test_real_mini_config_parses_with_derived_sizes():
    cfg = config_from_dict(preset_config("mini"))
    assert cfg.hidden_size == 2048 and cfg.num_hidden_layers == 20 and cfg.head_dim == 128
    assert cfg.rotary_dim == 64 and cfg.moe_layers == list(range(1, 20))
    assert cfg.expert_bytes() == 3 * 2048 * 512 * 2  # 6 MiB
    assert cfg.kv_bytes_per_token() == 40 * 1024
    assert abs(cfg.total_params() / 1e9 - 16.26) < 0.01
    assert abs(cfg.dense_params() * 2 / 2**30 - 1.78) < 0.01


def test_real_flash_config_sizes():
    cfg = config_from_dict(preset_config("flash"))
    assert cfg.expert_bytes() == 24 * 2**20
    assert cfg.kv_bytes_per_token() == 64 * 1024
    assert abs(cfg.total_params() / 1e9 - 102.9) < 0.05


def test_unknown_keys_are_ignored_and_model_type_may_be_absent():
    raw = preset_config("tiny")
    raw["some_future_key"] = {"nested": True}
    raw.pop("model_type")
    cfg = config_from_dict(raw)
    assert cfg.model_type == "llada2_moe"


@pytest.mark.parametrize("key", ["hidden_size", "num_experts", "vocab_size"])
def test_missing_required_key_is_named(key):
    raw = preset_config("tiny")
    del raw[key]
    with pytest.raises(TideError, match=key):
        config_from_dict(raw)


def test_unsupported_model_type():
    raw = preset_config("tiny")
    raw["model_type"] = "llama"
    raw["architectures"] = ["LlamaForCausalLM"]
    with pytest.raises(TideError, match="unsupported model_type 'llama'"):
        config_from_dict(raw)


@pytest.mark.parametrize("change,match", [
    ({"num_experts": 30}, "multiple of n_group"),
    ({"num_attention_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -4}, "hidden_size must be positive"),
    ({"hidden_size": 64.5}, "whole number"),
    ({"topk_group": 9}, "topk_group"),
    ({"rms_norm_eps": float("nan")}, "finite"),
    ({"score_function": "softmax"}, "score_function"),
    ({"use_qk_norm": "yes"}, "true or false"),
])
def test_impossible_values_are_refused(change, match):
    raw = preset_config("tiny")
    raw.update(change)
    with pytest.raises(TideError, match=match):
        config_from_dict(raw)


def test_load_config_errors(tmp_path):
    with pytest.raises(TideError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(TideError, match="cannot read"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(TideError, match="JSON object"):
        load_config(tmp_path)

"""Shapes of the real LLaDA2.x checkpoints, and the miniature `tiny` used for the demo and tests.

mini and flash carry the real config.json fields and values (llada2_moe), so synthetic
checkpoints written from them load through exactly the code real ones do. flash22 is
LLaDA2.2-flash: the flash shape with block routing and the Levenshtein edit tokens (the values
of the technical report; not yet checked against the released config.json); tiny22 is `tiny`
with the same 2.2 keys, for tests.
"""

from __future__ import annotations

from typing import Any

from tidecli.errors import TideError

REAL_VOCAB = 157184

# Keys and values as published LLaDA2-mini config.json files carry them (transformers 4.57 writes
# `dtype`); auto_map names the remote code, which tide never executes.
_COMMON: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "dtype": "bfloat16",
    "embedding_dropout": 0.0,
    "first_k_dense_replace": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "llada2_moe",
    "moe_router_enable_expert_bias": True,
    "n_group": 8,
    "norm_head": False,
    "norm_softmax": False,
    "norm_topk_prob": True,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "output_dropout": 0.0,
    "output_router_logits": False,
    "pad_token_id": 156892,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 600000,
    "rotary_dim": 64,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "score_function": "sigmoid",
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "transformers_version": "4.57.1",
    "use_bias": False,
    "use_cache": False,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "use_sliding_window": False,
    "using_split_qkv_in_self_attention": False,
    "vocab_size": REAL_VOCAB,
}

# LLaDA2.2's additions (docs: llada22.md): 48 of 256 experts per 32-token routing block, the
# DELETE / SPLIT edit tokens, 128K positions; generation_config.json lists two stop ids.
_V22: dict[str, Any] = {
    "expert_capacity": 48,
    "block_size": 32,
    "delete_token_id": 156930,
    "split_token_id": 156931,
    "max_position_embeddings": 131072,
}
STOP_IDS_22 = [156892, 156900]  # <|endoftext|>, <|role_end|>

PRESETS: dict[str, dict[str, Any]] = {
    "mini": {
        **_COMMON,
        "hidden_size": 2048,
        "num_hidden_layers": 20,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "intermediate_size": 5120,
        "moe_intermediate_size": 512,
    },
    "flash": {
        **_COMMON,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 9216,
        "moe_intermediate_size": 1024,
    },
    # A laptop-sized model of the same architecture (the `demo` model): every feature on, tiny dims.
    "tiny": {
        **_COMMON,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "rotary_dim": 8,
        "max_position_embeddings": 4096,
    },
}
PRESETS["flash22"] = {**PRESETS["flash"], **_V22}
# tiny with the 2.2 keys: 8 of its 32 experts per routing block of 32 tokens (the decode block)
PRESETS["tiny22"] = {**PRESETS["tiny"], **_V22, "expert_capacity": 8,
                     "max_position_embeddings": 4096}


def stop_ids(raw: dict[str, Any]) -> int | list[int]:
    """generation_config.json's eos_token_id for a preset: the 2.2 list, else the eos id."""
    return list(STOP_IDS_22) if raw.get("delete_token_id") else 156892


def preset_config(name: str, *, layers: int | None = None,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in PRESETS:
        raise TideError(f"unknown preset {name!r}", f"choose one of {', '.join(PRESETS)}")
    raw = dict(PRESETS[name])
    if layers is not None:
        if layers < 1:
            raise TideError("--layers must be at least 1", "e.g. --layers 4")
        raw["num_hidden_layers"] = layers
        raw["max_window_layers"] = min(raw["max_window_layers"], layers)
    raw.update(overrides or {})
    return raw

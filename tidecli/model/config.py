"""`config.json` → a frozen `ModelConfig`. Unknown keys are ignored; missing or impossible ones
are refused with a message that names the field."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from tidecli.errors import TideError

SUPPORTED_MODEL_TYPES = ("llada2_moe",)
SUPPORTED_ARCHITECTURE = "LLaDA2MoeModelLM"

# Fields every LLaDA2 config.json carries; without them the shapes are unknown.
REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int  # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # every routed expert and (× num_shared_experts) the shared one
    num_experts: int
    num_experts_per_tok: int
    vocab_size: int
    head_dim: int = 0  # 0 → hidden_size // num_attention_heads
    num_shared_experts: int = 0
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    moe_router_enable_expert_bias: bool = True
    first_k_dense_replace: int = 0
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 16384
    use_qk_norm: bool = True
    tie_word_embeddings: bool = False
    model_type: str = "llada2_moe"
    # LLaDA2.2 (absent in 2.0/2.1): block routing admits `expert_capacity` experts per routing
    # block of `block_size` tokens (0: ordinary group-limited routing); edit tokens of its
    # Levenshtein decoding (0: none)
    expert_capacity: int = 0
    block_size: int = 0
    delete_token_id: int = 0
    split_token_id: int = 0

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.num_attention_heads > 0:  # else validate() refuses it
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    # Derived quantities used by loading, memory accounting and the planner.
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def block_routing(self) -> bool:
        return self.expert_capacity > 0

    @property
    def edit_token_ids(self) -> tuple[int, int] | None:
        """(DELETE, SPLIT) of Levenshtein decoding, when the checkpoint has them."""
        if self.delete_token_id and self.split_token_id:
            return self.delete_token_id, self.split_token_id
        return None

    def pool_experts(self, tokens: int) -> int:
        """The most distinct experts a MoE layer can use for `tokens` aligned tokens: with block
        routing, `expert_capacity` per routing block they span; else every expert."""
        if not self.block_routing:
            return self.num_experts
        windows = -(-tokens // self.block_size)
        return min(self.num_experts, windows * self.expert_capacity)

    def block_pool(self, tokens: int) -> int:
        """With block routing, the bound on a step's distinct experts per layer (the pool
        tide can follow); 0 without block routing (no such bound)."""
        return self.pool_experts(tokens) if self.block_routing else 0

    @property
    def qkv_rows(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate + up + down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def expert_bytes(self, dtype_bytes: int = 2) -> int:
        return self.expert_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    def dense_params(self) -> int:
        """Everything that is not a routed expert: embeddings, attention, norms, dense FFN,
        shared experts, routers, lm_head."""
        h, v = self.hidden_size, self.vocab_size
        attn = self.qkv_rows * h + self.num_attention_heads * self.head_dim * h
        norms = 2 * h + (2 * self.head_dim if self.use_qk_norm else 0)
        per_layer = attn + norms
        dense_ffn = 3 * h * self.intermediate_size
        shared = 3 * h * self.shared_intermediate_size
        router = self.num_experts * h + self.num_experts
        total = self.num_hidden_layers * per_layer
        total += self.first_k_dense_replace * dense_ffn
        total += self.num_moe_layers * (shared + router)
        total += v * h * (1 if self.tie_word_embeddings else 2) + h
        return total

    def total_params(self) -> int:
        return self.dense_params() + self.num_moe_layers * self.num_experts * self.expert_params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# No real size comes near this; larger values only overflow float arithmetic further on.
MAX_INT = 2**31 - 1


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not value.is_integer()):
        raise TideError(f"config.json: {name} must be a whole number, got {value!r:.40}",
                        "fix config.json or re-download the checkpoint")
    if abs(value) > MAX_INT:
        raise TideError(f"config.json: {name} is implausibly large (over {MAX_INT})",
                        "fix config.json or re-download the checkpoint")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, int | float) and \
            math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise TideError(f"config.json: {name} must be a finite number, got {value!r:.40}",
                        "fix config.json or re-download the checkpoint")
    return float(value)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build and validate a config. Unknown keys (sliding_window, auto_map, ...) are ignored."""
    if not isinstance(raw, dict):
        raise TideError("config.json does not hold a JSON object", "re-download the checkpoint")
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type is None and isinstance(archs, list) and SUPPORTED_ARCHITECTURE in archs:
        model_type = "llada2_moe"  # some published configs omit model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TideError(
            f"unsupported model_type {model_type!r:.40} in config.json",
            f"tide runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (the LLaDA2.x family)",
        )
    missing = [k for k in REQUIRED if raw.get(k) is None]
    if missing:
        raise TideError(f"config.json is missing {', '.join(missing)}",
                        "re-download the checkpoint's config.json")
    kwargs: dict[str, Any] = {}
    for f in fields(ModelConfig):
        if f.name not in raw or raw[f.name] is None:
            continue
        value = raw[f.name]
        if f.type == "int":
            kwargs[f.name] = _as_int(f.name, value)
        elif f.type == "float":
            kwargs[f.name] = _as_float(f.name, value)
        elif f.type == "bool":
            if not isinstance(value, bool):
                raise TideError(f"config.json: {f.name} must be true or false, got {value!r:.40}",
                                "fix config.json")
            kwargs[f.name] = value
        else:
            kwargs[f.name] = str(value)
    kwargs["model_type"] = model_type
    # The reference modeling code hard-wires sigmoid scoring and an fp32 router whatever
    # score_function / router_dtype say; only a config that asks for something else is refused.
    if raw.get("score_function") not in (None, "sigmoid"):
        raise TideError(
            f"config.json: score_function {raw['score_function']!r:.40} is not supported",
            "LLaDA2 checkpoints use sigmoid routing")
    cfg = ModelConfig(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg: ModelConfig) -> None:
    def bad(msg: str) -> TideError:
        return TideError(f"config.json: {msg}", "fix config.json or re-download the checkpoint")

    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "moe_intermediate_size", "num_experts",
                 "num_experts_per_tok", "vocab_size", "head_dim", "max_position_embeddings",
                 "n_group", "topk_group"):
        if getattr(cfg, name) <= 0:
            raise bad(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise bad(f"num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
                  f"num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.num_experts % cfg.n_group:
        raise bad(f"num_experts ({cfg.num_experts}) is not a multiple of n_group ({cfg.n_group})")
    if cfg.topk_group > cfg.n_group:
        raise bad(f"topk_group ({cfg.topk_group}) exceeds n_group ({cfg.n_group})")
    per_group = cfg.num_experts // cfg.n_group
    if cfg.num_experts_per_tok > cfg.topk_group * per_group:
        raise bad(f"num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds the experts in the "
                  f"{cfg.topk_group} kept groups")
    if cfg.n_group > 1 and per_group < 2:
        raise bad("group-limited routing needs at least 2 experts per group")
    if not 0 < cfg.partial_rotary_factor <= 1 or cfg.rotary_dim < 2 or cfg.rotary_dim % 2:
        raise bad(f"partial_rotary_factor {cfg.partial_rotary_factor} gives an odd or empty "
                  f"rotary slice of head_dim {cfg.head_dim}")
    if cfg.rms_norm_eps <= 0 or cfg.rope_theta <= 0:
        raise bad("rms_norm_eps and rope_theta must be positive")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        raise bad(f"first_k_dense_replace {cfg.first_k_dense_replace} is outside 0.."
                  f"{cfg.num_hidden_layers}")
    if cfg.num_shared_experts < 0:
        raise bad("num_shared_experts must not be negative")
    for name in ("expert_capacity", "block_size", "delete_token_id", "split_token_id"):
        if getattr(cfg, name) < 0:
            raise bad(f"{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.block_routing:
        if cfg.block_size == 0:
            raise bad("expert_capacity is set but block_size (the routing block) is not")
        if cfg.expert_capacity < cfg.num_experts_per_tok:
            raise bad(f"expert_capacity ({cfg.expert_capacity}) is below num_experts_per_tok "
                      f"({cfg.num_experts_per_tok})")
    edits = (cfg.delete_token_id, cfg.split_token_id)
    if any(edits) and not all(edits):
        raise bad("delete_token_id and split_token_id come together (Levenshtein decoding)")
    if all(edits):
        if cfg.delete_token_id == cfg.split_token_id:
            raise bad(f"delete_token_id and split_token_id are both {cfg.delete_token_id}")
        if max(edits) >= cfg.vocab_size:
            raise bad(f"an edit token id ({max(edits)}) is outside the vocabulary "
                      f"({cfg.vocab_size})")


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise TideError(f"no config.json in {folder}",
                        "point --model at a LLaDA2 checkpoint folder (it holds config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        what = "it nests too deeply" if isinstance(exc, RecursionError) else exc
        raise TideError(f"cannot read {path}: {what}",
                        "re-download the checkpoint's config.json") from exc
    return config_from_dict(raw)

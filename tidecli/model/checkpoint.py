"""Safetensors checkpoint access. The only module that knows LLaDA2 tensor names.

A checkpoint is opened by reading `config.json`, the `model.safetensors.index.json` weight map
(or a single `model.safetensors`), and every shard's header. Shapes are checked against the config
before any weight is read, and the offending tensor is named when one is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from tidecli.errors import TideError
from tidecli.model.config import ModelConfig, load_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code → (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "BF16": (2, "bfloat16"), "F16": (2, "float16"), "F32": (4, "float32"),
    "F64": (8, "float64"), "I64": (8, "int64"), "I32": (4, "int32"), "I16": (2, "int16"),
    "I8": (1, "int8"), "U8": (1, "uint8"), "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"),
}

# ---- tensor names -------------------------------------------------------------------------------

EMBED = "model.word_embeddings.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
PROJS = ("gate_proj", "up_proj", "down_proj")


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def expert_tensor_names(layer: int, expert: int) -> tuple[str, str, str]:
    p = f"{layer_prefix(layer)}.mlp.experts.{expert}"
    return tuple(f"{p}.{proj}.weight" for proj in PROJS)  # type: ignore[return-value]


def dense_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor that is not a routed expert, with the shape the config implies."""
    h, hd = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h), FINAL_NORM: (h,)}
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.attention.query_key_value.weight"] = (cfg.qkv_rows, h)
        shapes[f"{p}.attention.dense.weight"] = (h, cfg.num_attention_heads * hd)
        if cfg.use_qk_norm:
            shapes[f"{p}.attention.query_layernorm.weight"] = (hd,)
            shapes[f"{p}.attention.key_layernorm.weight"] = (hd,)
        if i < cfg.first_k_dense_replace:
            inter = cfg.intermediate_size
            shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
            continue
        shapes[f"{p}.mlp.gate.weight"] = (cfg.num_experts, h)
        if cfg.moe_router_enable_expert_bias:
            shapes[f"{p}.mlp.gate.expert_bias"] = (cfg.num_experts,)
        if cfg.num_shared_experts:
            si = cfg.shared_intermediate_size
            shapes[f"{p}.mlp.shared_experts.gate_proj.weight"] = (si, h)
            shapes[f"{p}.mlp.shared_experts.up_proj.weight"] = (si, h)
            shapes[f"{p}.mlp.shared_experts.down_proj.weight"] = (h, si)
    return shapes


def layer_tensor_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """Role → tensor name for layer i (roles are what the loader fills)."""
    p = layer_prefix(i)
    names = {
        "input_norm": f"{p}.input_layernorm.weight",
        "post_norm": f"{p}.post_attention_layernorm.weight",
        "qkv": f"{p}.attention.query_key_value.weight",
        "dense": f"{p}.attention.dense.weight",
    }
    if cfg.use_qk_norm:
        names["q_norm"] = f"{p}.attention.query_layernorm.weight"
        names["k_norm"] = f"{p}.attention.key_layernorm.weight"
    if i < cfg.first_k_dense_replace:
        for proj in PROJS:
            names[f"ffn.{proj}"] = f"{p}.mlp.{proj}.weight"
        return names
    names["router"] = f"{p}.mlp.gate.weight"
    if cfg.moe_router_enable_expert_bias:
        names["router_bias"] = f"{p}.mlp.gate.expert_bias"
    if cfg.num_shared_experts:
        for proj in PROJS:
            names[f"shared.{proj}"] = f"{p}.mlp.shared_experts.{proj}.weight"
    return names


def expert_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    return (i, h), (i, h), (h, i)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = dense_tensor_shapes(cfg)
    for layer in cfg.moe_layers:
        for e in range(cfg.num_experts):
            for name, shape in zip(expert_tensor_names(layer, e), expert_shapes(cfg), strict=True):
                shapes[name] = shape
    return shapes


# ---- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _bad_file(path: Path, what: str) -> TideError:
    return TideError(f"{path.name} is damaged: {what}",
                     "re-download this shard (a download was probably cut short)")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check every entry against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _bad_file(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad_file(path, f"header length {n} does not fit a {size}-byte file")
            blob = fh.read(n)
    except FileNotFoundError as exc:
        raise TideError(f"missing shard {path.name} in {path.parent}",
                        "re-download the checkpoint: the index names a file that is not there") \
            from exc
    except (OSError, ValueError) as exc:  # ValueError: a name the OS cannot take
        raise TideError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                        "check the file's permissions") \
            from exc
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad_file(path, "its header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise _bad_file(path, "its header is not a JSON object")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        label = _label(name)
        try:
            dtype = entry["dtype"]
            shape = tuple(_whole(d) for d in entry["shape"])
            b, e = (_whole(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise _bad_file(path, f"header entry for {label} is malformed") from exc
        if not isinstance(dtype, str) or dtype not in DTYPES or any(d < 0 for d in shape):
            raise _bad_file(path, f"{label} has dtype {dtype!r:.20} / shape {list(shape)!s:.60}")
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * DTYPES[dtype][0] or b < 0:
            raise _bad_file(path, f"{label} byte range does not match its shape")
        if data_start + e > size:
            raise _bad_file(path, f"{label} runs past the end of the file (truncated download?)")
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + b, data_start + e)
    # The format lays tensors out back to back; overlapping ranges mean a corrupt header.
    spans = sorted(infos.values(), key=lambda t: (t.begin, t.end))
    for prev, cur in zip(spans, spans[1:], strict=False):
        if cur.begin < prev.end:
            raise _bad_file(path, f"{_label(prev.name)} and {_label(cur.name)} overlap")
    return infos


def _label(name: str) -> str:
    """A tensor name from a header as it can appear in a one-line message."""
    return name if name.isprintable() and len(name) < 200 else f"{name!r:.80}"


def _whole(value: object) -> int:
    """A header number: a JSON integer (booleans, fractions and strings are malformed)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not an integer: {value!r:.20}")
    return value


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
            wmap = raw["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                RecursionError) as exc:
            raise TideError(f"{INDEX_FILE} in {folder} is unreadable",
                            "re-download the checkpoint's index file") from exc
        if not isinstance(wmap, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise TideError(f"{INDEX_FILE} has a malformed weight_map", "re-download it")
        for shard in set(wmap.values()):
            # a bare, printable file name inside the folder: no separators, no way out
            if not shard or not shard.isprintable() or shard.startswith("..") \
                    or any(c in shard for c in "/\\") or os.sep in shard:
                raise TideError(f"{INDEX_FILE} names an odd shard path {shard!r:.60}",
                                "re-download it")
        return wmap
    if (folder / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in read_header(folder / SINGLE_FILE)}
    raise TideError(f"no safetensors weights in {folder}",
                    f"the folder needs {INDEX_FILE} and its shards, or {SINGLE_FILE}")


class Checkpoint:
    """An opened checkpoint: config, and where every tensor the model needs lives."""

    def __init__(self, folder: str | Path, config: ModelConfig, tensors: dict[str, TensorInfo]):
        self.folder = Path(folder)
        self.config = config
        self.tensors = tensors

    @classmethod
    def open(cls, folder: str | Path, config: ModelConfig | None = None) -> Checkpoint:
        folder = Path(folder)
        cfg = config or load_config(folder)
        wmap = _weight_map(folder)
        headers: dict[str, dict[str, TensorInfo]] = {}
        for shard in sorted(set(wmap.values())):
            headers[shard] = read_header(folder / shard)
        tensors: dict[str, TensorInfo] = {}
        for name, shape in expected_shapes(cfg).items():
            shard = wmap.get(name)
            if shard is None:
                raise TideError(f"checkpoint has no tensor {name}",
                                "the checkpoint is incomplete or does not match config.json")
            info = headers[shard].get(name)
            if info is None:
                raise TideError(f"{shard} does not hold {name} although the index says so",
                                "re-download the checkpoint")
            if info.shape != shape:
                raise TideError(
                    f"{name} has shape {list(info.shape)}, config.json implies {list(shape)}",
                    "the weights do not match config.json; re-download both")
            if not info.dtype.startswith(("F", "BF")):
                raise TideError(f"{name} has non-float dtype {info.dtype}",
                                "quantized checkpoints are not supported yet")
            tensors[name] = info
        return cls(folder, cfg, tensors)

    # ---- reading ------------------------------------------------------------------------------

    def expert_infos(self, layer: int, expert: int) -> tuple[TensorInfo, TensorInfo, TensorInfo]:
        g, u, d = expert_tensor_names(layer, expert)
        return self.tensors[g], self.tensors[u], self.tensors[d]

    def expert_dtype(self) -> str:
        layer = self.config.moe_layers[0] if self.config.moe_layers else None
        if layer is None:
            return "BF16"
        return self.expert_infos(layer, 0)[0].dtype

    def routed_expert_bytes(self) -> int:
        return sum(info.nbytes for name, info in self.tensors.items() if ".mlp.experts." in name)

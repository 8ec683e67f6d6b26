import json
import struct

import pytest
import torch
from safetensors import safe_open

from tidecli.errors import TideError
from tidecli.model import checkpoint as ck
from tidecli.model.checkpoint import Checkpoint, read_header
from tidecli.model.config import config_from_dict
from tidecli.model.presets import preset_config
from tidecli.model.synth import write_checkpoint
from tidecli.model.tensorio import ShardReader


def test_tensor_names_follow_the_published_layout():
    cfg = config_from_dict(preset_config("mini"))
    shapes = ck.expected_shapes(cfg)
    assert shapes["model.word_embeddings.weight"] == (157184, 2048)
    assert shapes["lm_head.weight"] == (157184, 2048)
    assert shapes["model.layers.0.attention.query_key_value.weight"] == (3072, 2048)
    assert shapes["model.layers.0.attention.dense.weight"] == (2048, 2048)
    assert shapes["model.layers.0.attention.query_layernorm.weight"] == (128,)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (5120, 2048)
    assert "model.layers.0.mlp.gate.weight" not in shapes  # layer 0 is dense
    assert shapes["model.layers.1.mlp.gate.weight"] == (256, 2048)
    assert shapes["model.layers.1.mlp.gate.expert_bias"] == (256,)
    assert shapes["model.layers.19.mlp.experts.255.down_proj.weight"] == (2048, 512)
    assert shapes["model.layers.1.mlp.experts.0.up_proj.weight"] == (512, 2048)
    assert shapes["model.layers.1.mlp.shared_experts.gate_proj.weight"] == (512, 2048)
    assert "model.layers.20.input_layernorm.weight" not in shapes
    n_expert_tensors = sum(".mlp.experts." in n for n in shapes)
    assert n_expert_tensors == 19 * 256 * 3


def test_synth_round_trip_matches_the_safetensors_library(tiny_ckpt):
    c = Checkpoint.open(tiny_ckpt)
    index = json.loads((tiny_ckpt / ck.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded, with an index
    with ShardReader() as reader:
        for name in ["model.word_embeddings.weight", "model.layers.1.mlp.gate.expert_bias",
                     "model.layers.2.mlp.experts.5.down_proj.weight", "lm_head.weight"]:
            info = c.tensors[name]
            ours = reader.read(info)
            with safe_open(str(info.file), framework="pt") as f:
                theirs = f.get_tensor(name)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert c.tensors["model.layers.1.mlp.gate.expert_bias"].dtype == "F32"
    assert c.tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LLaDA2MoeModelLM"] and cfg["model_type"] == "llada2_moe"


def test_weights_are_finite_and_deterministic(tmp_path):
    a = write_checkpoint(tmp_path / "a", preset="tiny", layers=2, seed=3, device="cpu")
    b = write_checkpoint(tmp_path / "b", preset="tiny", layers=2, seed=3, device="cpu")
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    with ShardReader() as r:
        for name in ca.tensors:
            ta, tb = r.read(ca.tensors[name]), r.read(cb.tensors[name])
            assert torch.equal(ta, tb), name
            assert torch.isfinite(ta.float()).all(), name


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_wrong_shape_names_the_tensor(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TideError, match=r"model\.layers\.1\.mlp\.shared_experts\.gate_proj\.weight "
                                        r"has shape \[32, 64\], config.json implies \[48, 64\]"):
        Checkpoint.open(bad)


def test_missing_shard_truncated_shard_and_garbage_header(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "bad")
    shards = sorted(bad.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(TideError, match="missing shard"):
        Checkpoint.open(bad)
    bad2 = _copy(tiny_ckpt, tmp_path / "bad2")
    s = sorted(bad2.glob("model-*.safetensors"))[0]
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    with pytest.raises(TideError, match="truncated|runs past the end"):
        Checkpoint.open(bad2)
    bad3 = _copy(tiny_ckpt, tmp_path / "bad3")
    s = sorted(bad3.glob("model-*.safetensors"))[0]
    raw = s.read_bytes()
    s.write_bytes(struct.pack("<Q", 16) + b"{garbage garbage" + raw[24:])
    with pytest.raises(TideError, match="not valid JSON"):
        read_header(s)


def test_single_file_checkpoint(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    single = tmp_path / "single"
    single.mkdir()
    c = Checkpoint.open(tiny_ckpt)
    with ShardReader() as r:
        tensors = {n: r.read(i) for n, i in c.tensors.items()}
    save_file(tensors, str(single / "model.safetensors"))
    (single / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    c2 = Checkpoint.open(single)
    assert set(c2.tensors) == set(c.tensors)


def test_nan_weights_are_refused(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    from tidecli.model.loader import load_dense

    bad = _copy(tiny_ckpt, tmp_path / "nan")
    c = Checkpoint.open(bad)
    info = c.tensors["model.layers.0.attention.dense.weight"]
    with safe_open(str(info.file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[info.name][0, 0] = float("nan")
    save_file(tensors, str(info.file), metadata={"format": "pt"})
    with pytest.raises(TideError, match="attention.dense.weight contains NaN"):
        load_dense(Checkpoint.open(bad), device=torch.device("cpu"), dtype=torch.float32)

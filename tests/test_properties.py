"""Property tests: random corruptions of config.json, safetensors headers and the index file end
in a parsed result or a TideError, never in another exception; what parses is self-consistent."""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidecli.errors import TideError
from tidecli.model.checkpoint import DTYPES, INDEX_FILE, Checkpoint, read_header
from tidecli.model.config import REQUIRED, ModelConfig, config_from_dict, load_config
from tidecli.model.presets import preset_config

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=12))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# numbers near the valid range reach deeper checks than arbitrary JSON does
small_numbers = st.integers(-3, 70) | st.sampled_from([0.5, 1e-9, 64.0, 2.5, 2**31, 10**400])


def parses_or_refuses(fn, *args):
    try:
        return fn(*args)
    except TideError as exc:
        assert exc.message and "\n" not in exc.message
        return None


# ---- config.json --------------------------------------------------------------------------------

TINY = preset_config("tiny")
CONFIG_KEYS = sorted(set(TINY) | set(REQUIRED) | {"head_dim", "score_function"})
config_edits = st.lists(st.one_of(
    st.tuples(st.just("del"), st.sampled_from(CONFIG_KEYS), st.none()),
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), json_values),
    st.tuples(st.just("set"), st.sampled_from(CONFIG_KEYS), small_numbers),
), max_size=6)


def check_config(cfg: ModelConfig | None) -> None:
    if cfg is None:
        return
    assert cfg.head_dim > 0 and cfg.rotary_dim >= 2 and cfg.rotary_dim % 2 == 0
    assert cfg.num_experts % cfg.n_group == 0 and cfg.topk_group <= cfg.n_group
    assert 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers
    assert cfg.total_params() > 0 and cfg.kv_bytes_per_token() > 0
    assert all(math.isfinite(v) for v in (cfg.rms_norm_eps, cfg.rope_theta))


@settings(max_examples=300, deadline=None)
@given(config_edits)
def test_config_edits_parse_or_refuse(edits):
    raw = dict(TINY)
    for op, key, value in edits:
        if op == "del":
            raw.pop(key, None)
        else:
            raw[key] = value
    check_config(parses_or_refuses(config_from_dict, raw))


@FAST
@given(json_values)
def test_any_json_as_config_parses_or_refuses(value):
    check_config(parses_or_refuses(config_from_dict, value))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


@FAST
@given(st.binary(max_size=300) | st.lists(st.tuples(st.integers(0, 2000), st.binary(max_size=4)),
                                          min_size=1, max_size=4))
def test_damaged_config_file_parses_or_refuses(scratch, damage):
    text = json.dumps(TINY).encode()
    if isinstance(damage, bytes):
        text = damage
    else:  # splice a few bytes in at random places of a valid file
        for at, data in damage:
            at = at % (len(text) + 1)
            text = text[:at] + data + text[at + len(data) // 2:]
    (scratch / "config.json").write_bytes(text)
    check_config(parses_or_refuses(load_config, scratch))


# ---- safetensors headers ------------------------------------------------------------------------

BASE_ENTRIES = {"a": ("F32", [2, 3]), "b": ("BF16", [4]), "c": ("F32", [0]), "d": ("I8", [3])}


def valid_header() -> tuple[dict, int]:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in BASE_ENTRIES.items():
        size = math.prod(shape) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


names = st.sampled_from([*BASE_ENTRIES, "new", "two\nlines", "__metadata__"])
header_edits = st.lists(st.one_of(
    st.tuples(st.just("field"), names, st.sampled_from(["dtype", "shape", "data_offsets"]),
              json_values),
    st.tuples(st.just("field"), names, st.just("dtype"),
              st.sampled_from([*DTYPES, "F4", "", "bf16"])),
    st.tuples(st.just("field"), names, st.just("shape"),
              st.lists(st.integers(-2, 6), max_size=3)),
    st.tuples(st.just("field"), names, st.just("data_offsets"),
              st.lists(st.integers(-8, 80), min_size=2, max_size=2)),  # overlaps, past the end
    st.tuples(st.just("entry"), names, st.none(), json_values),
    st.tuples(st.just("drop"), names, st.none(), st.none()),
), max_size=5)
length_fields = st.none() | st.integers(0, 2**64 - 1) | st.integers(-16, 16)
file_cuts = st.none() | st.integers(0, 400)


@FAST
@given(header_edits, length_fields, file_cuts, st.booleans())
def test_corrupted_header_reads_or_refuses(scratch, edits, length, cut, as_random_json):
    header, data_size = valid_header()
    for op, name, field, value in edits:
        if op == "drop":
            header.pop(name, None)
        elif op == "entry":
            header[name] = value
        else:
            entry = header.get(name)
            if not isinstance(entry, dict):
                entry = header[name] = {}
            entry[field] = value
    blob = json.dumps(header).encode()
    if as_random_json:
        blob = json.dumps(edits).encode()
    n = len(blob) if length is None else (length if length >= 0 else len(blob) + length)
    raw = struct.pack("<Q", n % 2**64) + blob + bytes(range(data_size % 256)) + bytes(data_size)
    if cut is not None:
        raw = raw[:cut]
    path = scratch / "model.safetensors"
    path.write_bytes(raw)
    infos = parses_or_refuses(read_header, path)
    if infos is None:
        return
    spans = sorted((i.begin, i.end) for i in infos.values())
    for (_, e0), (b1, _) in zip(spans, spans[1:], strict=False):
        assert e0 <= b1  # no overlaps
    for info in infos.values():
        assert 8 <= info.begin <= info.end <= len(raw)
        assert info.nbytes == math.prod(info.shape) * DTYPES[info.dtype][0]


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_as_a_shard_read_or_refuse(scratch, data):
    path = scratch / "random.safetensors"
    path.write_bytes(data)
    parses_or_refuses(read_header, path)


def test_huge_header_length_is_refused_without_reading_it(scratch):
    path = scratch / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(TideError, match="header length"):
        read_header(path)


# ---- the index file -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_folder(tiny_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "m"
    folder.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix == ".safetensors":
            (folder / f.name).symlink_to(f)
        else:
            shutil.copyfile(f, folder / f.name)
    return folder, json.loads((tiny_ckpt / INDEX_FILE).read_text())


shard_names = st.text(max_size=12) | st.sampled_from([
    "", ".", "..", "../x", "a/b", "a\\b", "x\0y", "\ud800", "config.json", "tokenizer.json",
    "model.safetensors", "model-00001-of-00003.safetensors", "n" * 300])
index_edits = st.lists(st.one_of(
    st.tuples(st.just("map"), st.integers(0, 500), shard_names),
    st.tuples(st.just("map"), st.integers(0, 500), json_values),
    st.tuples(st.just("drop"), st.integers(0, 500), st.none()),
    st.tuples(st.just("weight_map"), st.none(), json_values),
    st.tuples(st.just("index"), st.none(), json_values),
), max_size=4)


@FAST
@given(index_edits)
def test_corrupted_index_opens_or_refuses(index_folder, edits):
    folder, good = index_folder
    index = json.loads(json.dumps(good))
    names = sorted(good["weight_map"])
    for op, at, value in edits:
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if op == "index":
            index = value
        elif op == "weight_map" and isinstance(index, dict):
            index["weight_map"] = value
        elif isinstance(wmap, dict) and op == "map":
            wmap[names[at % len(names)]] = value
        elif isinstance(wmap, dict) and op == "drop":
            wmap.pop(names[at % len(names)], None)
    (folder / INDEX_FILE).write_text(json.dumps(index))
    ckpt = parses_or_refuses(Checkpoint.open, folder)
    if ckpt is not None:  # only harmless edits (e.g. a tensor mapped to the shard it is in)
        assert set(ckpt.tensors) <= set(good["weight_map"])

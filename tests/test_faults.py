"""The fault suite, bad input: every wrong path, damaged checkpoint and out-of-range option of
docs/errors.md ends in one `error:` line plus a `hint:` line (exit 1, no traceback); Ctrl-C
exits 130. Faults while running and writing: test_faults_runtime.py.

The real CLI runs in-process through `tidecli.cli.main` (one check runs it as a process).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tidecli.model.checkpoint import INDEX_FILE, Checkpoint

from helpers import clone, edit_json, gen, shards, tide, user_error

# ---- model path, config.json --------------------------------------------------------------------


@pytest.mark.parametrize("where,message,hint", [
    ("nope", "model folder {p} does not exist", "Hub id"),
    ("a_file", "--model {p} is a file, not a checkpoint folder", "config.json"),
    ("", "no config.json in {p}", "config.json"),
])
def test_model_path_missing_or_without_config(tmp_path, capsys, where, message, hint):
    (tmp_path / "a_file").write_text("x")
    path = tmp_path / where
    user_error(gen(path), capsys, message.format(p=path), hint=hint)


def test_unreadable_config_json(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    (bad / "config.json").write_text('{"hidden_size": 64,')
    user_error(gen(bad), capsys, "cannot read", contains="config.json", hint="re-download")


def test_unsupported_model_type(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    edit_json(bad / "config.json", lambda c: c.update(model_type="llama",
                                                       architectures=["LlamaForCausalLM"]))
    user_error(gen(bad), capsys, "unsupported model_type 'llama'", hint="LLaDA2")


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": None}, "config.json is missing hidden_size"),
    ({"num_attention_heads": 0}, "config.json: num_attention_heads must be positive"),
    ({"num_experts": 30}, "config.json: num_experts (30) is not a multiple of n_group"),
    ({"hidden_size": "64"}, "config.json: hidden_size must be a whole number"),
    ({"num_hidden_layers": 10**40}, "config.json: num_hidden_layers is implausibly large"),
    ({"rms_norm_eps": 1e400}, "config.json: rms_norm_eps must be a finite number"),
    ({"partial_rotary_factor": 1e-9}, "config.json: partial_rotary_factor"),
    ({"first_k_dense_replace": 9}, "config.json: first_k_dense_replace 9 is outside"),
])
def test_config_missing_field_or_impossible_value(tiny_ckpt, tmp_path, capsys, change, message):
    bad = clone(tiny_ckpt, tmp_path / "m")
    edit_json(bad / "config.json", lambda c: c.update(change))
    user_error(gen(bad), capsys, message, hint="config.json")


# ---- weights ------------------------------------------------------------------------------------


def test_index_naming_a_missing_shard(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    shards(bad)[1].unlink()
    user_error(gen(bad), capsys, "missing shard model-00002-of-", hint="re-download")


def test_index_missing_a_tensor(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    name = "model.layers.2.mlp.experts.7.up_proj.weight"
    edit_json(bad / INDEX_FILE, lambda i: i["weight_map"].pop(name))
    user_error(gen(bad), capsys, f"checkpoint has no tensor {name}")


def test_unreadable_index(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    (bad / INDEX_FILE).write_text("[" * 100_000)  # deep nesting, not just bad JSON
    user_error(gen(bad), capsys, f"{INDEX_FILE} in", contains="unreadable")


@pytest.mark.parametrize("keep,message", [
    (0.5, "runs past the end of the file"),  # cut inside the data
    (100, "header length"),  # cut inside the header
    (3, "shorter than a safetensors header"),
])
def test_truncated_shard(tiny_ckpt, tmp_path, capsys, keep, message):
    bad = clone(tiny_ckpt, tmp_path / "m", copy=(shards(tiny_ckpt)[0].name,))
    shard = shards(bad)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    user_error(gen(bad), capsys, f"{shard.name} is damaged", contains=message,
               hint="re-download this shard")


@pytest.mark.parametrize("header,message", [
    (b"{garbage garbage", "its header is not valid JSON"),
    (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
     b'"y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', "x and y overlap"),
    (b'{"x": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "x has dtype ['F32']"),
    (b'{"x": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}',
     "header entry for x is malformed"),
])
def test_garbage_shard_header(tiny_ckpt, tmp_path, capsys, header, message):
    bad = clone(tiny_ckpt, tmp_path / "m", copy=(shards(tiny_ckpt)[0].name,))
    shard = shards(bad)[0]
    shard.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    user_error(gen(bad), capsys, f"{shard.name} is damaged: {message}",
               hint="re-download this shard")


def test_random_bytes_as_shard(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m", copy=(shards(tiny_ckpt)[0].name,))
    shards(bad)[0].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                             generator=torch.Generator().manual_seed(0))
                               .numpy().tobytes())
    user_error(gen(bad), capsys, f"{shards(bad)[0].name} is damaged")


def test_tensor_shape_contradicts_config(tiny_ckpt, tmp_path, capsys):
    bad = clone(tiny_ckpt, tmp_path / "m")
    edit_json(bad / "config.json", lambda c: c.update(moe_intermediate_size=48))
    user_error(gen(bad), capsys, "model.layers.1.mlp.shared_experts.gate_proj.weight has shape "
               "[32, 64], config.json implies [48, 64]", hint="do not match config.json")


# Decided: NaN/inf weights are refused (not warned about), naming the tensor and its shard.
@pytest.mark.parametrize("name,value", [
    ("model.layers.0.attention.dense.weight", b"\xc0\x7f"),  # bf16 NaN, a dense tensor
    ("model.layers.3.mlp.experts.31.down_proj.weight", b"\x80\x7f"),  # bf16 +inf, an expert
])
def test_nan_or_inf_weight_is_refused(tiny_ckpt, tmp_path, capsys, name, value):
    info = Checkpoint.open(tiny_ckpt).tensors[name]
    bad = clone(tiny_ckpt, tmp_path / "m", copy=(info.file.name,))
    with open(bad / info.file.name, "r+b") as fh:
        fh.seek(info.begin + 2 * 5)
        fh.write(value)
    user_error(gen(bad), capsys, f"{name} contains NaN or inf values",
               hint=f"re-download {info.file.name}")


# ---- tokenizer and Hub --------------------------------------------------------------------------


@pytest.mark.parametrize("content,message", [
    (None, "no tokenizer files in"), ("{}", "cannot load the tokenizer in")])
def test_tokenizer_files_missing_or_corrupt(tiny_ckpt, tmp_path, capsys, content, message):
    bad = clone(tiny_ckpt, tmp_path / "m")
    if content is None:
        (bad / "tokenizer.json").unlink()
    else:
        (bad / "tokenizer.json").write_text(content)
    user_error(gen(bad), capsys, message, hint="tokenizer.json")


def test_hub_id_while_offline(capsys):
    user_error(gen(Path("no-such-org/no-such-model")), capsys,
               "no-such-org/no-such-model is not in the local Hub cache and HF_HUB_OFFLINE is set",
               hint="unset HF_HUB_OFFLINE")


def test_hub_unreachable(monkeypatch, capsys):
    import huggingface_hub

    def snapshot_download(repo_id, **kw):  # nothing cached, and no network
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr("tidecli.model.resolve.hub_reachable", lambda: True)  # no traffic
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    user_error(gen(Path("no-such-org/no-such-model")), capsys,
               "cannot download no-such-org/no-such-model: the Hub is unreachable",
               hint="connect to the internet")


# ---- prompts and options ------------------------------------------------------------------------


def test_empty_prompt(tiny_ckpt, capsys):
    argv = gen(tiny_ckpt)
    argv[1] = "  \n "
    user_error(argv, capsys, "the prompt is empty")


def test_prompt_longer_than_the_model(tiny_ckpt, capsys):
    argv = gen(tiny_ckpt, "--raw")
    argv[1] = "hello " * 1400  # 4200 tokens > 4096 positions
    user_error(argv, capsys, "the prompt is 4200 tokens; the model holds 4096 positions",
               hint="shorten the prompt")
    argv[1] = "hello " * 1000
    user_error(argv + ["--gen-length", "1500"], capsys,
               "prompt (3000 tokens) + --gen-length 1500 exceeds the model's 4096 positions",
               hint="--gen-length 1096 or less")


@pytest.mark.parametrize("extra,message", [
    (["--threshold", "0"], "--threshold must be in (0, 1], got 0.0"),
    (["--threshold", "1.5"], "--threshold must be in (0, 1], got 1.5"),
    (["--threshold", "nan"], "--threshold must be in (0, 1]"),
    (["--block-length", "30"], "--block-length 30 does not divide the model's 4096 positions"),
    (["--block-length", "0"], "--block-length must be at least 1"),
    (["--gen-length", "0"], "--gen-length must be at least 1"),
    (["--temperature", "-1"], "--temperature must not be negative"),
    (["--temperature", "nan"], "--temperature must not be negative"),
    (["--vram", "-2", "--policy", "lru"], "--vram must be a positive number of GiB"),
    (["--vram", "nan"], "--vram must be a positive number of GiB"),
    (["--experts-per-layer", "-1"], "--experts-per-layer must be in 0..32, got -1"),
    (["--cpu-threads", "-1", "--policy", "lru"], "--cpu-threads must not be negative"),
    (["--cpu-threads", "100000"], "--cpu-threads 100000 is more than the"),  # torch segfaulted
    (["--policy", "fastest"], "unknown policy 'fastest'"),
    (["--dtype", "int3"], "unknown dtype 'int3'"),
])
def test_out_of_range_options(tiny_ckpt, capsys, monkeypatch, extra, message):
    def no_loading(*a, **kw):
        raise AssertionError("options must be refused before the weights load")

    monkeypatch.setattr("tidecli.runtime.engine.load_dense", no_loading)
    user_error(gen(tiny_ckpt, *extra), capsys, message)


def test_vram_below_the_dense_part(tiny_ckpt, capsys):
    user_error(gen(tiny_ckpt, "--vram", "0.01", "--policy", "lru"), capsys,
               "--vram 0.01 GiB cannot hold the dense part of the model", hint="at least")


# ---- Ctrl-C, internal errors, TIDE_DEBUG --------------------------------------------------------


def test_ctrl_c_while_loading_exits_130(tiny_ckpt, monkeypatch, capsys):
    import tidecli.runtime.engine

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tidecli.runtime.engine, "load_dense", interrupted)
    code, out, err = tide(gen(tiny_ckpt), capsys)
    assert code == 130 and out == "" and err.strip() == "interrupted"


def test_an_unexpected_exception_is_one_line(tiny_ckpt, monkeypatch, capsys):
    import tidecli.runtime.engine

    def bug(*a, **kw):
        raise ZeroDivisionError("integer division by zero")

    monkeypatch.setattr(tidecli.runtime.engine, "load_dense", bug)
    user_error(gen(tiny_ckpt), capsys, "internal error: ZeroDivisionError: integer division",
               hint="TIDE_DEBUG=1")


def test_real_process_traceback_only_with_tide_debug(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIDE_DEBUG"}
    argv = [sys.executable, "-m", "tidecli", "generate", "hi", "-m", str(tmp_path / "nope")]
    plain = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.splitlines()[0] == f"error: model folder {tmp_path / 'nope'} does not exist"
    assert len(plain.stderr.splitlines()) == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run(argv, capture_output=True, text=True, env={**env, "TIDE_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "TideError" in debug.stderr


@pytest.mark.parametrize("argv, runner", [
    (["plan", "-p", "rtx4090", "-o", "{missing}/plan.json"], "tidecli.commands.plan.run_plan"),
    (["bench", "-o", "{missing}/bench.json"], "tidecli.commands.bench.run_bench"),
    (["bench", "--plot", "{missing}/bench.png"], "tidecli.commands.bench.run_bench"),
    (["profile", "-o", "{missing}/profile.json"], "tidecli.commands.profile.run_profile"),
])
def test_an_output_path_is_checked_before_the_work(tmp_path, capsys, monkeypatch, argv, runner):
    def no_work(*a, **kw):
        raise AssertionError("the output path must be refused before any work")

    monkeypatch.setattr(runner, no_work)
    into_missing = [a.format(missing=tmp_path / "missing") for a in argv]
    user_error(into_missing, capsys, "cannot write", contains="does not exist")
    onto_a_folder = [str(tmp_path) if "{missing}" in a else a for a in argv]
    user_error(onto_a_folder, capsys, "cannot write", contains="it is a folder")

"""LLaDA2.2 checkpoints end to end on the tiny 2.2 model: the synthetic files (edit tokens, stop
ids), loading beside 2.0/2.1, the decoding chosen, block routing bounds in real forward passes,
the cached path against the reference path, and the one-line errors."""

import json

import torch

from tidecli.model.checkpoint import Checkpoint
from tidecli.model.tokenizer import ChatTokenizer

from helpers import clone, edit_json, gen, tide, user_error


def test_synthetic_22_files_carry_the_new_keys_edit_tokens_and_stop_ids(tiny22_ckpt):
    raw = json.loads((tiny22_ckpt / "config.json").read_text())
    assert (raw["expert_capacity"], raw["block_size"]) == (8, 32)
    assert (raw["delete_token_id"], raw["split_token_id"]) == (156930, 156931)
    gen_cfg = json.loads((tiny22_ckpt / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [156892, 156900]
    tok = ChatTokenizer(tiny22_ckpt)
    assert tok.tok.convert_tokens_to_ids("<|delete|>") == 156930
    assert tok.tok.convert_tokens_to_ids("<|split|>") == 156931
    assert tok.ids.stop == {156892, 156900} and tok.ids.mask == 156895
    assert tok.decode([156930, 156931]) == ""  # special: never shown
    cfg = Checkpoint.open(tiny22_ckpt).config
    assert cfg.block_routing and cfg.edit_token_ids == (156930, 156931)


def test_20_checkpoints_load_as_before_and_read_stop_ids_from_generation_config(tiny_ckpt,
                                                                                tmp_path):
    tok = ChatTokenizer(tiny_ckpt)
    assert tok.ids.stop == {156892}
    cfg = Checkpoint.open(tiny_ckpt).config
    assert not cfg.block_routing and cfg.edit_token_ids is None
    ckpt = clone(tiny_ckpt, tmp_path / "c")
    edit_json(ckpt / "generation_config.json", lambda d: d.update(eos_token_id=[156892, 156900]))
    assert ChatTokenizer(ckpt).ids.stop == {156892, 156900}
    (ckpt / "generation_config.json").unlink()
    assert ChatTokenizer(ckpt).ids.stop == {156892}  # the tokenizer's eos stays


def test_generate_on_22_uses_levenshtein_and_shows_no_edit_token(tiny22_ckpt, capsys):
    code, out, err = tide(gen(tiny22_ckpt, "--json", "--gen-length", "40"), capsys)
    assert code == 0, err
    data = json.loads(out)
    assert (data["decoding"], data["threshold"], data["editing_threshold"]) == \
        ("levenshtein", 0.5, 0.0)
    assert not {156930, 156931, 156895} & set(data["token_ids"])
    assert "<|delete|>" not in data["text"] and "<|split|>" not in data["text"]
    code, out, err = tide(gen(tiny22_ckpt, "--json", "--decoding", "threshold"), capsys)
    assert code == 0, err


def test_one_line_errors_for_22_options(tiny22_ckpt, tiny_ckpt, capsys):
    user_error(gen(tiny22_ckpt, "--block-length", "16"), capsys,
               "--block-length 16 is not a multiple of the model's routing block (32 tokens)",
               hint="--block-length 32")
    user_error(gen(tiny_ckpt, "--decoding", "levenshtein"), capsys,
               "--decoding levenshtein needs a checkpoint with edit tokens")
    user_error(gen(tiny_ckpt, "--decoding", "threshold", "--editing-threshold", "0.5"), capsys,
               "--editing-threshold does not apply to --decoding threshold")
    user_error(gen(tiny_ckpt, "--decoding", "fast"), capsys, "unknown decoding 'fast'")


def test_engine_picks_the_decoding_and_presets(tiny22_ckpt, tiny_ckpt):
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.levenshtein import LevenshteinDecoder
    from tidecli.runtime.engine import Engine
    from tidecli.runtime.options import engine_options

    eng = Engine(engine_options(model=str(tiny22_ckpt), device="cpu"), quiet=True)
    s = eng.decode_settings(DecodeSettings())
    assert (s.decoding, s.threshold, s.editing_threshold, s.max_post_steps) == \
        ("levenshtein", 0.5, 0.0, 16)
    s = eng.decode_settings(DecodeSettings(threshold=0.9, editing_threshold=0.3))
    assert (s.decoding, s.threshold, s.editing_threshold) == ("levenshtein", 0.9, 0.3)
    assert isinstance(eng.decoder([1, 2, 3], DecodeSettings(gen_length=8)), LevenshteinDecoder)
    eng.close()
    old = Engine(engine_options(model=str(tiny_ckpt), device="cpu"), quiet=True)
    assert old.decode_settings(DecodeSettings()).decoding == "threshold"
    assert old.decode_settings(DecodeSettings()).threshold == 0.95
    s = old.decode_settings(DecodeSettings(editing_threshold=0.5))
    assert (s.decoding, s.threshold) == ("editing", 0.95)
    old.close()


def test_a_step_never_uses_more_experts_than_its_routing_blocks_admit(tiny22_ckpt):
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.levenshtein import LevenshteinDecoder

    from helpers import PROMPT, load_model

    model, ckpt = load_model(tiny22_ckpt)
    rt = model.experts
    trace = rt.enable_trace()
    for bl in (32, 64):  # one routing block per step, then two
        d = LevenshteinDecoder(model, PROMPT, DecodeSettings(gen_length=64, block_length=bl,
                                                             decoding="levenshtein"),
                               mask_id=156895, eos_ids={156892}, edit_ids=(156930, 156931),
                               device=torch.device("cpu"))
        for _ in d.steps():
            pass
    counts = trace.array()  # [forwards, layers, experts]
    kinds = trace.kinds
    for f in range(counts.shape[0]):
        used = (counts[f] > 0).sum(-1)
        tokens = trace.tokens[f]
        assert used.max() <= ckpt.config.pool_experts(tokens), (kinds[f], tokens)
    assert "prefill" in kinds
    assert (counts > 0).sum(-1).max() > 8  # two routing blocks: two pools of 8 (of 32)


def test_cached_path_matches_the_reference_path(tiny22_ckpt):
    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.levenshtein import LevenshteinDecoder

    from helpers import PROMPT, load_model

    model, _ = load_model(tiny22_ckpt)
    out = []
    for cache in (True, False):
        d = LevenshteinDecoder(model, PROMPT, DecodeSettings(gen_length=40, use_cache=cache,
                                                             decoding="levenshtein"),
                               mask_id=156895, eos_ids={156892}, edit_ids=(156930, 156931),
                               device=torch.device("cpu"))
        for _ in d.steps():
            pass
        out.append(d.result.token_ids)
    assert out[0] == out[1] and len(out[0]) == 40


def test_chat_set_switches_editing_for_2x_and_keeps_levenshtein_editing():
    import pytest

    from tidecli.decode.diffusion import DecodeSettings
    from tidecli.decode.session import ChatSession
    from tidecli.errors import TideError

    s = ChatSession(settings=DecodeSettings(gen_length=16).resolved(edit_tokens=False),
                    max_positions=4096)
    assert s.settings.decoding == "threshold"
    s.set_option("editing_threshold", "0.5")
    assert (s.settings.decoding, s.settings.editing_threshold) == ("editing", 0.5)
    s.set_option("editing_threshold", "off")
    assert (s.settings.decoding, s.settings.editing_threshold) == ("threshold", None)
    lev = ChatSession(settings=DecodeSettings(gen_length=16).resolved(edit_tokens=True),
                      max_positions=4096)
    assert "levenshtein decoding · threshold 0.5" in lev.describe_settings()
    lev.set_option("editing_threshold", "0.9")
    assert lev.settings.decoding == "levenshtein" and lev.settings.editing_threshold == 0.9
    with pytest.raises(TideError, match="always edits"):
        lev.set_option("editing_threshold", "off")

import json

import pytest

from tidecli.errors import TideError
from tidecli.model.tokenizer import ChatTokenizer


def test_special_ids_come_from_the_tokenizer(tiny_ckpt):
    tok = ChatTokenizer(tiny_ckpt)
    assert tok.ids.mask == 156895 and tok.ids.eos == 156892 and tok.ids.end_of_turn == 156900
    assert tok.ids.source == "tokenizer"


def test_chat_template_renders_the_llada2_format(tiny_ckpt):
    tok = ChatTokenizer(tiny_ckpt)
    one = tok.render_chat([{"role": "user", "content": "Q"}])
    assert one == ("<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Q"
                   "<|role_end|><role>ASSISTANT</role>")
    two = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}])
    assert two == ("<role>SYSTEM</role>S\ndetailed thinking off<|role_end|><role>HUMAN</role>Q"
                   "<|role_end|><role>ASSISTANT</role>A<|role_end|><role>HUMAN</role>R"
                   "<|role_end|><role>ASSISTANT</role>")
    ids = tok.encode_chat([{"role": "user", "content": "Hello"}])
    assert ids[0] == 157151 and ids[-1] == 157152  # <role> ... </role>
    assert tok.decode(ids) == "SYSTEMdetailed thinking offHUMANHelloASSISTANT"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_mask_token_that_ends_turns_is_refused(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "t")
    cfg = json.loads((bad / "tokenizer_config.json").read_text())
    cfg["mask_token"] = "<|endoftext|>"
    (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bad / "special_tokens_map.json").unlink()
    with pytest.raises(TideError, match="mask id 156892 is also an end"):
        ChatTokenizer(bad)


def test_missing_tokenizer_files(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt, tmp_path / "t")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(TideError, match="no tokenizer files"):
        ChatTokenizer(bad)

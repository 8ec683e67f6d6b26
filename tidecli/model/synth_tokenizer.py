"""A synthetic tokenizer in the format of the LLaDA2 tokenizer files.

Byte-level BPE (NFC normaliser, the Ling/LLaDA2 split regex, ByteLevel decoding) whose special
tokens sit at the real ids: `<|endoftext|>` 156892 (eos, pad), `<|mask|>` 156895, `<|role_end|>`
156900, `<role>` 157151, `</role>` 157152, with `vocab_size` 157184 rows in the model (LLaDA2.2
checkpoints add the edit tokens `<|delete|>` and `<|split|>` in place of two reserved tokens at the
ids their config.json names: the names are ours, the real ones were not checked). The ordinary
vocabulary holds the 256 byte symbols, merges for a few hundred common English words, and
pronounceable filler words, so a random-weight model writes readable nonsense.
"""

from __future__ import annotations

import json
from pathlib import Path

FIRST_SPECIAL = 156891
SPECIALS: list[tuple[int, str]] = [
    (156891, "<|startoftext|>"),
    (156892, "<|endoftext|>"),
    (156893, "[CLS]"),
    (156894, "[gMASK]"),
    (156895, "<|mask|>"),
    (156896, "<tool_call>"),
    (156897, "</tool_call>"),
    (156898, "<tool_response>"),
    (156899, "</tool_response>"),
    (156900, "<|role_end|>"),
    *[(156895 + n, f"<|reserved_token_{n}|>") for n in range(6, 256)],
    (157151, "<role>"),
    (157152, "</role>"),
]

# The pre-tokenizer split pattern of the Ling / LLaDA2 tokenizer (letters with an optional
# leading non-letter, single digits, punctuation runs, newlines, spaces).
SPLIT_REGEX = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")

# Renders exactly like the published LLaDA2 template for system / user / assistant turns:
# <role>SYSTEM</role>[system\n]detailed thinking off<|role_end|><role>HUMAN</role>...<|role_end|>
# <role>ASSISTANT</role>  (tool calls are not modelled by the synthetic checkpoints).
CHAT_TEMPLATE = (
    "{%- set thinking_option = 'off' -%}"
    "{{- '<role>SYSTEM</role>' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{{- 'detailed thinking ' + thinking_option + '<|role_end|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<role>HUMAN</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<role>ASSISTANT</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- elif message['role'] == 'system' and not loop.first -%}"
    "{{- '<role>SYSTEM</role>' + message['content'] + '<|role_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<role>ASSISTANT</role>' -}}"
    "{%- endif -%}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when what will so "
    "if no more out up into do any can about time only new some could these two may first then "
    "other like than made many over such after most also where did well through back years much "
    "very world how just good because each those people make state between life being under day "
    "know work same way us should still even while must own long here right think little great "
    "take old see before high year where hello model tokens diffusion expert mixture block step "
    "memory copy answer question write code python function return value list text language "
    "small large fast slow more less water city house river light night music story number "
    "system user assistant please thank help explain why what who how when"
).split()

_ONSETS = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr",
           "st", "sh", "ch", "pl", "gr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "n", "r", "l", "s", "m"]


def bytes_to_unicode() -> list[tuple[int, str]]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100 on,
    listed in the order byte-level vocabularies use (printable ranges first)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    pairs = [(b, chr(b)) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            pairs.append((b, chr(256 + extra)))
            extra += 1
    return pairs


def _encode_bytes(text: str, table: dict[int, str]) -> str:
    return "".join(table[b] for b in text.encode("utf-8"))


def build_vocab() -> tuple[dict[str, int], list[str]]:
    table = dict(bytes_to_unicode())
    vocab: dict[str, int] = {}
    for _, ch in bytes_to_unicode():
        vocab[ch] = len(vocab)
    merges: list[str] = []

    def add_word(word: str) -> None:
        symbols = list(word)
        current = symbols[0]
        for nxt in symbols[1:]:
            merged = current + nxt
            if merged not in vocab:
                merges.append(f"{current} {nxt}")
                vocab[merged] = len(vocab)
            current = merged

    for w in ("  ", "\n\n"):
        add_word(_encode_bytes(w, table))
    for w in _WORDS:
        for form in (w, " " + w, " " + w.capitalize()):
            add_word(_encode_bytes(form, table))
    space = table[ord(" ")]
    syllables = [o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS]
    for a in syllables:
        for b in syllables:
            if len(vocab) >= FIRST_SPECIAL:
                break
            token = space + a + b
            if token not in vocab:
                vocab[token] = len(vocab)
    if len(vocab) != FIRST_SPECIAL:
        raise AssertionError(f"synthetic vocab has {len(vocab)} entries")
    return vocab, merges


EDIT_TOKENS = ("<|delete|>", "<|split|>")


def specials(edit_ids: tuple[int, int] | None = None) -> list[tuple[int, str]]:
    """The added tokens; with `edit_ids` (DELETE, SPLIT) the reserved tokens at those ids become
    the edit tokens."""
    names = dict(zip(edit_ids, EDIT_TOKENS, strict=True)) if edit_ids else {}
    return [(i, names.get(i, tok)) for i, tok in SPECIALS]


def tokenizer_json(edit_ids: tuple[int, int] | None = None) -> dict:
    vocab, merges = build_vocab()
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for i, tok in specials(edit_ids)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
    }


def tokenizer_config() -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "cls_token": "[CLS]",
        "eos_token": "<|endoftext|>",
        "fast_tokenizer": True,
        "gmask_token": "[gMASK]",
        "mask_token": "<|mask|>",
        "merges_file": None,
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "trust_remote_code": True,
        "vocab_file": None,
    }


def special_tokens_map() -> dict:
    return {"bos_token": "<|startoftext|>", "cls_token": "[CLS]", "eos_token": "<|endoftext|>",
            "gmask_token": "[gMASK]", "mask_token": "<|mask|>", "pad_token": "<|endoftext|>"}


def write_tokenizer_files(folder: Path, *, edit_ids: tuple[int, int] | None = None) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(edit_ids),
                                                      ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2,
                                                             ensure_ascii=False), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2),
                                                    encoding="utf-8")

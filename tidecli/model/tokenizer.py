"""Tokenizer and chat template through transformers, from the checkpoint folder only.

Special ids are read from the tokenizer (mask, eos, end of turn) and fall back to the documented
LLaDA2 ids; a mask id that doubles as an end-of-turn token is refused, since decoding could then
never tell a finished position from an open one. The stop ids are the eos id and those
`generation_config.json` lists (`eos_token_id`: one id or a list; LLaDA2.2 lists two).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tidecli.errors import TideError

DOC_MASK_ID = 156895
DOC_EOS_ID = 156892
DOC_ROLE_END = "<|role_end|>"


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    eos: int
    end_of_turn: int | None
    source: str  # "tokenizer" or "documented fallback"
    stop: frozenset[int] = field(default_factory=frozenset)  # eos + generation_config's ids

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", frozenset(self.stop) | {self.eos})


def generation_stop_ids(folder: Path) -> list[int]:
    """`eos_token_id` of generation_config.json (an id or a list), [] when absent or unreadable:
    the tokenizer's eos id stays a stop id either way."""
    path = folder / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return []
    ids = raw.get("eos_token_id") if isinstance(raw, dict) else None
    ids = ids if isinstance(ids, list) else [ids]
    return [int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0]


class ChatTokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            raise TideError(f"no tokenizer files in {folder}",
                            "the folder needs tokenizer.json and tokenizer_config.json; "
                            "re-download them from the model's repository")
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            logging.getLogger("transformers").setLevel(logging.ERROR)
            with warnings.catch_warnings():  # config deprecation notes are not the user's concern
                warnings.simplefilter("ignore")
                self.tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                         trust_remote_code=False)
        except Exception as exc:  # transformers raises many types for broken files
            raise TideError(f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}",
                            "re-download tokenizer.json and tokenizer_config.json") from exc
        self.ids = self._special_ids(generation_stop_ids(folder))

    def _special_ids(self, stops: list[int]) -> SpecialIds:
        tok = self.tok
        mask = getattr(tok, "mask_token_id", None)
        eos = tok.eos_token_id
        source = "tokenizer"
        if mask is None:
            mask, source = self._lookup("<|mask|>", DOC_MASK_ID), "documented fallback"
        if eos is None:
            eos, source = self._lookup("<|endoftext|>", DOC_EOS_ID), "documented fallback"
        eot = self._lookup(DOC_ROLE_END, None)
        if mask in (eos, eot):
            raise TideError(f"the tokenizer's mask id {mask} is also an end-of-text/turn token",
                            "this tokenizer does not belong to a LLaDA2 checkpoint")
        if mask in stops:
            raise TideError(f"generation_config.json lists the mask id {mask} as a stop id",
                            "fix generation_config.json's eos_token_id")
        return SpecialIds(mask=int(mask), eos=int(eos), end_of_turn=eot, source=source,
                          stop=frozenset(stops))

    def _lookup(self, token: str, fallback: int | None) -> int | None:
        tid = self.tok.convert_tokens_to_ids(token)
        if tid is None or tid == self.tok.unk_token_id:
            return fallback
        return int(tid)

    def __len__(self) -> int:
        return len(self.tok)

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.has_chat_template():
            raise TideError("the tokenizer has no chat template",
                            "use --raw to send the prompt as is, or add tokenizer_config.json")
        # tokenize=False then encode: the same on transformers 4.5x and 5.x
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.render_chat(messages))

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, tid: int) -> str:
        """Text of one token for the live view (special tokens shown as empty)."""
        return self.tok.decode([tid], skip_special_tokens=True)

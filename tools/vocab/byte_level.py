"""Byte-level BPE tokenizers (GPT-2 style: Llama 3, SmolLM, Qwen): a tokenizer.json whose model is
BPE over the 256 byte symbols of the ByteLevel pre-tokenizer, found behind a tokenizer path and
refused with one clear line when it is something else.

In such a tokenizer every token is a string over 256 printable stand-ins for the bytes 0-255
(GPT-2's `bytes_to_unicode`: " " is "Ġ", the UTF-8 bytes of "中" E4 B8 AD are "ä¸Ń"), so text of
any script is always encodable, and a token's bytes are its symbols mapped back.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from chla_launcher.contract.errors import ChlaError


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol table (the printable bytes stand for themselves, the others are
    shifted to U+0100 onwards), as the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def _symbol_bytes() -> dict[str, int]:
    return {symbol: byte for byte, symbol in byte_symbols().items()}


def token_bytes(token: str) -> bytes | None:
    """The bytes a byte-level token stands for; None if it is not made of byte symbols (an added
    token such as <|im_start|> kept as text)."""
    table = _symbol_bytes()
    try:
        return bytes(table[symbol] for symbol in token)
    except KeyError:
        return None


def _tokenizer_json_in(path: Path) -> Path | None:
    """tokenizer.json behind `path`: the file, or in an HF directory, or in a merge_tokenizer
    stage's out/tokenizer/; None where a SentencePiece tokenizer.model sits beside it."""
    if path.is_file():
        return path
    for folder in (path, path / "tokenizer"):
        if (folder / "tokenizer.json").is_file():
            return None if (folder / "tokenizer.model").is_file() else folder / "tokenizer.json"
    return None


def resolve_tokenizer_json(path: str | os.PathLike[str], *, role: str) -> Path:
    """tokenizer.json behind `path` (the file itself or an HF tokenizer directory)."""
    path = Path(path)
    found = _tokenizer_json_in(path)
    if found is None:
        what = "has no tokenizer.json" if path.is_dir() else "not found"
        raise ChlaError(f"{path}: {role} {what}; pass an HF tokenizer directory or its tokenizer.json")
    return found


def _mentions_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    if component.get("type") == "ByteLevel":
        return True
    return any(_mentions_byte_level(step) for step in component.get("pretokenizers", []))


def is_byte_level_bpe(path: str | os.PathLike[str]) -> bool:
    """Is `path` (a directory or tokenizer.json) a byte-level BPE tokenizer? A directory holding a
    SentencePiece tokenizer.model is not: its tokenizer.json is derived from that model."""
    candidate = _tokenizer_json_in(Path(path))
    if candidate is None or candidate.suffix != ".json":
        return False
    try:
        data = json.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and (data.get("model") or {}).get("type") == "BPE"
        and _mentions_byte_level(data.get("pre_tokenizer"))
    )


def load_byte_level_bpe(path: str | os.PathLike[str], *, role: str) -> dict[str, Any]:
    """The parsed tokenizer.json behind `path`, checked to be a byte-level BPE chla can extend:
    its merges normalised to [left, right] pairs (tokenizers < 0.20 wrote "left right")."""
    file = resolve_tokenizer_json(path, role=role)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ChlaError(f"{file}: {role} is not valid JSON ({error}); pass a tokenizer.json") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else "no model"
        raise ChlaError(
            f"{file}: {role} is a {kind} tokenizer, not BPE; byte-level vocabulary extension needs a "
            "BPE tokenizer.json (Llama 3, SmolLM, Qwen), and `chla vocab merge` takes SentencePiece bases"
        )
    if not _mentions_byte_level(data.get("pre_tokenizer")):
        raise ChlaError(
            f"{file}: {role} has no ByteLevel pre-tokenizer; byte-level vocabulary extension needs a "
            "GPT-2-style byte-level BPE (a SentencePiece-style BPE base takes `chla vocab train`)"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise ChlaError(f"{file}: {role} sets model.{key} {model[key]!r}; chla extends byte-level BPE without it")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # tokenizers raises a bare Exception naming the field
        raise ChlaError(f"{file}: {role}: the installed tokenizers cannot read it ({error})") from None
    merges = model.get("merges") or []
    model["merges"] = [pair.split(" ", 1) if isinstance(pair, str) else list(pair) for pair in merges]
    return data


def build_component(key: str, config: dict):
    """The tokenizer.json component `key` ("normalizer", "pre_tokenizer") built from `config`."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    probe = json.loads(Tokenizer(BPE()).to_str())
    probe[key] = config
    return getattr(Tokenizer.from_str(json.dumps(probe)), key)


def canonical_component(key: str, config: dict | None) -> str:
    """`config` as tokenizers writes it back (defaults filled in, keys sorted), so that two
    tokenizer.json files written by different versions compare equal when they mean the same."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    if config is None:
        return "null"
    tokenizer = Tokenizer(BPE())
    setattr(tokenizer, key, build_component(key, config))
    return json.dumps(json.loads(tokenizer.to_str())[key], sort_keys=True)

"""HF tokenizer directories that transformers 4 and 5 both load.

transformers 5 saves a tokenizer with `tokenizer_class: TokenizersBackend`, a class transformers 4
does not have (4.57 raises "Tokenizer class TokenizersBackend does not exist"), and much of the
ecosystem (serving stacks, the original project's scripts) still runs transformers 4. Every
tokenizer chla writes therefore names `PreTrainedTokenizerFast`: both versions load it from
tokenizer.json exactly as written (normaliser, merges, BOS post-processor, added tokens), which is
also why it is not LlamaTokenizerFast, whose transformers 5 form rebuilds the pre-tokenizer (see
chla_tools.vocab). The raw SentencePiece model travels beside it as tokenizer.model, and the
special tokens are repeated in special_tokens_map.json, which transformers 4 also reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chla_launcher.contract.atomic import write_json

PORTABLE_CLASS = "PreTrainedTokenizerFast"
# Saved by transformers 5 only; transformers 4 cannot resolve them.
_V5_ONLY_CLASSES = {"TokenizersBackend"}
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """`tokenizer.save_pretrained(directory)` made portable, plus the raw SentencePiece model the
    tokenizer was loaded with (transformers 5 writes only tokenizer.json)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    source = Path(tokenizer.name_or_path) / "tokenizer.model"
    if source.is_file() and not (directory / "tokenizer.model").exists():
        shutil.copyfile(source, directory / "tokenizer.model")
    make_portable(directory)
    return directory


def make_portable(directory: str | Path) -> bool:
    """Rewrite a saved tokenizer directory so that transformers 4 loads it too. Returns whether
    anything changed. A class both versions know (LlamaTokenizerFast, a user's own) is kept."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file() or not (directory / "tokenizer.json").is_file():
        return False
    config = json.loads(config_path.read_text(encoding="utf-8"))
    changed = False
    if config.get("tokenizer_class") in _V5_ONLY_CLASSES:
        config["tokenizer_class"] = PORTABLE_CLASS
        # Written by transformers 5 about how it loaded, not about the tokenizer.
        for key in ("backend", "is_local", "local_files_only"):
            config.pop(key, None)
        write_json(config_path, config)
        changed = True
    if "added_tokens_decoder" not in config:
        beyond = _added_beyond_sentencepiece(directory)
        if beyond:
            # transformers 4 writes this block itself, and llama.cpp's converter names the tokens
            # that tokenizer.model lacks (a [PAD] added by HF) from it and nowhere else.
            config["added_tokens_decoder"] = beyond
            write_json(config_path, config)
            changed = True
    special = {key: config[key] for key in _SPECIAL_KEYS if isinstance(config.get(key), str)}
    map_path = directory / "special_tokens_map.json"
    if special and not map_path.is_file():
        write_json(map_path, special)
        changed = True
    return changed


def _added_beyond_sentencepiece(directory: Path) -> dict[str, dict]:
    """tokenizer.json's added tokens whose ids lie past the pieces of tokenizer.model, in the
    form of transformers 4's `added_tokens_decoder`."""
    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        return {}
    import sentencepiece

    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_file)).get_piece_size()
    added = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    return {
        str(token["id"]): {key: value for key, value in token.items() if key != "id"}
        for token in added
        if token["id"] >= pieces
    }

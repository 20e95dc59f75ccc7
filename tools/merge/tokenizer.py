"""The tokenizer the merged model ships: which directory has one, and its size, read without
importing transformers."""

from __future__ import annotations

from pathlib import Path

from chla_launcher.contract.errors import ChlaError

from .checkpoint import read_json_file

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() and (
        (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file()
    )


def tokenizer_size(tokenizer_dir: Path) -> int:
    """len(AutoTokenizer.from_pretrained(dir)), read without importing transformers (which would
    add ~100 MB and seconds to a merge): tokenizer.json through `tokenizers`, else the
    SentencePiece model plus the added tokens listed in tokenizer_config.json / added_tokens.json."""
    try:
        if (tokenizer_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        import sentencepiece

        ids = set(
            range(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).vocab_size())
        )
        decoder = read_json_file(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        ids.update(int(i) for i in decoder)
        if (tokenizer_dir / "added_tokens.json").is_file():
            ids.update(int(i) for i in read_json_file(tokenizer_dir / "added_tokens.json").values())
        return len(ids)
    except ChlaError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file can fail in many ways
        raise ChlaError(
            f"tokenizer in {tokenizer_dir} does not load ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); fix or replace its files"
        ) from None


def check_tokenizer(tokenizer_dir: Path, vocab_rows: int | None) -> None:
    size = tokenizer_size(tokenizer_dir)
    if vocab_rows is not None and size > vocab_rows:
        raise ChlaError(
            f"tokenizer in {tokenizer_dir} has {size} tokens but the merged model has "
            f"{vocab_rows} embedding rows; the adapter that added tokens must save embed_tokens "
            "and lm_head (modules_to_save)"
        )

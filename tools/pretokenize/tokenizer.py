"""The tokenizer's identity (a hash of its files) and the choice of encoder: SentencePiece directly
where it gives the HF tokenizer's ids (checked once per tokenizer on probe texts), else HF."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chla_launcher.contract.atomic import read_json, write_json
from chla_launcher.contract.errors import ChlaError

from .hashing import blake, hash_file
from .options import PretokenizeOptions


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """Hash of every file of the tokenizer directory (names and contents)."""
    if not tokenizer_dir.is_dir():
        raise ChlaError(
            f"pretokenize: tokenizer {tokenizer_dir} is not a directory; pass an HF "
            f"tokenizer directory (tokenizer.model / tokenizer.json + tokenizer_config.json)"
        )
    digest = blake()
    for path in sorted(p for p in tokenizer_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(path.name.encode() + b"\0" + hash_file(path).encode() + b"\n")
    return digest.hexdigest()


# Probe texts for the sentencepiece-vs-HF check: Chinese, English, mixed, digits, full-width,
# byte-fallback characters. Runs of spaces are checked separately (HF's conversion of
# SentencePiece BPE is known to merge "▁▁" differently; reported, not fatal).
PROBES = [
    "中共中央总书记、国家主席江泽民发表１９９８年新年讲话《迈向充满希望的新世纪》。",
    "却说曹操引兵至汉中，见山势险峻，谓众将曰：“此处可以屯兵。”",
    "这款手机的屏幕很清晰，电池也耐用，就是价格有点贵！",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "混合 mixed text 与 English words 和数字 12345 以及 emoji 😀 and ÄÖÜ ß.",
    'Tabs\tand\nnewlines, (brackets) [1] {x: y} <tag> & "quotes" — dash… ellipsis',
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст.",
    "trailing spaces  ",
    "a",
    "。",
    "１２３ＡＢＣ　全角空格",
]
SPACE_PROBES = ["  leading spaces", "hello  world", "double  space   triple", "x    y"]


@dataclass
class TokenizerInfo:
    path: str
    fingerprint: str
    vocab_size: int  # len(HF tokenizer): base vocabulary plus added tokens
    eos_id: int | None
    bos_id: int | None
    sp_model: str | None  # tokenizer.model usable for the fast path, else None
    encoder_check: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= 1 << 16 else np.dtype("<u4")


def load_hf_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as exc:  # the library raises many types for a bad directory
        raise ChlaError(
            f"pretokenize: cannot load tokenizer from {tokenizer_dir}: {exc}; pass an HF tokenizer directory"
        ) from exc


def _inspect_tokenizer(tokenizer_dir: Path, fingerprint: str) -> TokenizerInfo:
    tokenizer = load_hf_tokenizer(tokenizer_dir)
    info = TokenizerInfo(
        path=str(tokenizer_dir),
        fingerprint=fingerprint,
        vocab_size=len(tokenizer),
        eos_id=tokenizer.eos_token_id,
        bos_id=tokenizer.bos_token_id,
        sp_model=None,
    )
    sp_path = tokenizer_dir / "tokenizer.model"
    if not sp_path.is_file():
        info.encoder_check = {"sentencepiece": False, "reason": "no tokenizer.model"}
        return info
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    except Exception as exc:
        info.encoder_check = {"sentencepiece": False, "reason": f"tokenizer.model unreadable: {exc}"}
        return info
    # SentencePiece-based means: every piece has the same id in the HF tokenizer.
    vocab = tokenizer.get_vocab()
    same_ids = all(vocab.get(sp.id_to_piece(i)) == i for i in range(sp.get_piece_size()))
    # One text a call: a batch call would start the tokenizers thread pool, which then warns in
    # every forked worker.
    hf_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROBES + SPACE_PROBES]
    sp_ids = sp.encode(PROBES + SPACE_PROBES)
    agree = [a == b for a, b in zip(sp_ids, hf_ids)]
    disagreements = [text for text, ok in zip(PROBES + SPACE_PROBES, agree) if not ok]
    plain_agree = all(agree[: len(PROBES)])
    info.encoder_check = {
        "sentencepiece": bool(same_ids and plain_agree),
        "same_piece_ids": same_ids,
        "probes": len(agree),
        "agree": sum(agree),
        "disagree_on": disagreements,
    }
    if same_ids and plain_agree:
        info.sp_model = str(sp_path)
    return info


def load_tokenizer_info(tokenizer_dir: str | Path, cache_dir: Path) -> TokenizerInfo:
    """Vocabulary size, special ids and encoder check, computed once per tokenizer fingerprint
    (it needs transformers, ~3 s to import) and kept in the cache."""
    tokenizer_dir = Path(tokenizer_dir).resolve()
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    record = cache_dir / "tokenizers" / f"{fingerprint}.json"
    cached = read_json(record)
    if cached is not None:
        cached["path"] = str(tokenizer_dir)
        return TokenizerInfo(**cached)
    info = _inspect_tokenizer(tokenizer_dir, fingerprint)
    write_json(record, asdict(info))
    return info


def choose_encoder(info: TokenizerInfo, options: PretokenizeOptions) -> str:
    if options.encoder == "hf":
        return "hf"
    if options.encoder == "sentencepiece":
        if not (Path(info.path) / "tokenizer.model").is_file():
            raise ChlaError(
                f"pretokenize: encoder: sentencepiece but {info.path} has no tokenizer.model; use encoder: auto or hf"
            )
        return "sentencepiece"
    return "sentencepiece" if info.sp_model else "hf"

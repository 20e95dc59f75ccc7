"""Tokenizer merge: a SentencePiece model's new pieces appended to a LLaMA-style base tokenizer
(base ids unchanged), written as merged.model and an HF tokenizer directory.

New pieces are appended after the base with strictly decreasing scores, all below every base
score and distinct in float32: id order and score order agree for them, whatever converter reads
the .model, and the fast tokenizer chla_tools.vocab.fast_tokenizer writes encodes exactly as
SentencePiece does; the merge checks fast == SentencePiece on the text of every new piece before
writing. The original project appended every new piece with score 0, above every LLaMA piece and
all equal, so its HF fast tokenizer disagreed with SentencePiece on about half of Chinese lines;
`scores: original` reproduces that tokenizer exactly for models trained with it.

A byte-level BPE base (a tokenizer.json with a ByteLevel pre-tokenizer: Llama 3, SmolLM, Qwen)
is merged by chla_tools.vocab.bpe_merge instead, with a train_bpe output as `add`.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.contract.atomic import new_directory, write_json
from chla_launcher.contract.errors import ChlaError

from .bpe_merge import PAD_TOKEN, merge_byte_level
from .byte_level import is_byte_level_bpe
from .fast_tokenizer import write_hf_tokenizer
from .log import Log, print_line
from .sp_model import CONTROL, NORMAL, load_sp_proto, mergeable, model_pb2, resolve_sp_model

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.merge_tokenizer import MergeTokenizerParams


def _scores_below(lowest: float, count: int) -> list[float]:
    """`count` strictly decreasing float32 values below `lowest` (the step grows with the
    magnitude: near LLaMA's -1e9 whitespace scores float32 can only tell values 64 apart)."""

    def float32(value: float) -> float:
        return struct.unpack("f", struct.pack("f", value))[0]

    scores, current = [], float32(lowest)
    for _ in range(count):
        step = 1.0
        while (candidate := float32(current - step)) >= current:
            step *= 2  # float32 rounding swallowed the step
        scores.append(candidate)
        current = candidate
    return scores


# How the appended pieces are scored (merge_tokenizer.params.scores).
SCORES_BELOW_BASE = "below_base"
SCORES_ORIGINAL = "original"


def merge_tokenizers(
    params: MergeTokenizerParams, out_dir: str | os.PathLike[str], log: Log = print_line
) -> dict[str, Any]:
    """Append the pieces of the model `params.add` that the base lacks to the base SentencePiece
    model `params.base`.

    Writes out_dir/merged.model, out_dir/tokenizer/ (HF tokenizer dir) and out_dir/merge.json.
    Base ids and scores are unchanged. With `params.pad_token`, exactly one control piece "[PAD]" is
    appended last (the SFT variant: the original project's 49953 -> 49954).

    `params.scores`: "below_base" (chla's) gives the new pieces strictly decreasing scores below
    every base score, so the HF fast tokenizer agrees with SentencePiece exactly (module docstring).
    "original" does what the original merge_tokenizers.py does, byte for byte: every piece of
    the added model whose text the base lacks is appended, in order, with only its text and score 0
    set (no type). Pieces, ids and the .model equal the original's; but where several pieces
    share a score SentencePiece merges the leftmost pair first and a ranked-merge tokenizer the
    higher-ranked one, so the fast tokenizer then disagrees with SentencePiece on some lines
    (vocab_report measures how many); the merge logs the share of its probe strings that agree.
    """
    if is_byte_level_bpe(params.base):
        return merge_byte_level(params, out_dir, log)
    import sentencepiece as spm

    started = time.monotonic()
    pad_token, scores = params.pad_token, params.scores
    base_path = resolve_sp_model(params.base, role="base tokenizer")
    add_path = Path(params.add)
    if is_byte_level_bpe(add_path):
        raise ChlaError(
            f"{add_path}: a byte-level BPE cannot be merged into the SentencePiece base {base_path}; "
            "train the addition with train_spm (`chla vocab train`)"
        )
    if add_path.is_dir():
        add_path = resolve_sp_model(add_path, role="added SentencePiece model")
    if not add_path.exists():
        raise ChlaError(f"{add_path}: SentencePiece model to add not found; train one with `chla vocab train`")
    merged = load_sp_proto(base_path, role="base tokenizer")
    added = load_sp_proto(add_path, role="added model")
    if merged.trainer_spec.model_type != model_pb2().TrainerSpec.BPE:
        raise ChlaError(
            f"{base_path}: base tokenizer is a SentencePiece "
            f"{model_pb2().TrainerSpec.ModelType.Name(merged.trainer_spec.model_type)}"
            " model; merging appends BPE pieces and needs a BPE base (LLaMA 1/2)"
        )
    if pad_token and any(p.piece == PAD_TOKEN for p in merged.pieces):
        raise ChlaError(f"{base_path}: base already has a {PAD_TOKEN} piece; drop --pad-token")

    base_size = len(merged.pieces)
    known = {p.piece for p in merged.pieces}
    piece_class = model_pb2().ModelProto.SentencePiece
    new_pieces = []
    if scores == SCORES_ORIGINAL:
        for piece in added.pieces:
            if piece.piece not in known:
                new_pieces.append(piece.piece)
                merged.pieces.append(piece_class(piece=piece.piece, score=0))
    else:
        for piece in added.pieces:
            if piece.type == NORMAL and piece.piece not in known:
                known.add(piece.piece)
                new_pieces.append(piece.piece)
        lowest = min(p.score for p in merged.pieces if mergeable(p))
        for text, score in zip(new_pieces, _scores_below(lowest, len(new_pieces))):
            merged.pieces.append(piece_class(piece=text, score=score, type=NORMAL))
    merged_size = len(merged.pieces)
    if pad_token:
        merged.pieces.append(model_pb2().ModelProto.SentencePiece(piece=PAD_TOKEN, score=0.0, type=CONTROL))
    data = merged.SerializeToString()

    out_dir = Path(out_dir)
    with new_directory(out_dir) as tmp:
        (tmp / "merged.model").write_bytes(data)
        write_hf_tokenizer(data, tmp / "tokenizer", pad_token=PAD_TOKEN if pad_token else None)
        checked, agreeing = _check_fast_matches_sentencepiece(
            tmp / "tokenizer", new_pieces, log, exact=scores == SCORES_BELOW_BASE
        )
        summary = {
            "base": str(base_path),
            "added_model": str(add_path),
            "base_size": base_size,
            "added_model_size": len(added.pieces),
            "new_pieces": len(new_pieces),
            "merged_size": merged_size,
            "pad_token": PAD_TOKEN if pad_token else None,
            "final_size": len(merged.pieces),
            "scores": scores,
            "fast_slow_checked_strings": checked,
            "fast_slow_agreeing_strings": agreeing,
        }
        write_json(tmp / "merge.json", summary)
    arithmetic = f"{base_size} + {len(new_pieces)} new = {merged_size}"
    if pad_token:
        arithmetic += f"; + {PAD_TOKEN} = {len(merged.pieces)}"
    log(f"merged vocabulary: {arithmetic} ({time.monotonic() - started:.1f} s) -> {out_dir}")
    summary["arithmetic"] = arithmetic
    summary["seconds"] = round(time.monotonic() - started, 2)
    # sentencepiece must accept what we wrote
    spm.SentencePieceProcessor(model_file=str(out_dir / "merged.model"))
    return summary


def _check_fast_matches_sentencepiece(
    tokenizer_dir: Path, new_pieces: list[str], log: Log, exact: bool = True
) -> tuple[int, int]:
    """Encode the text of every new piece (alone and in runs) both ways. With `exact`, any
    difference is a bug in build_fast_tokenizer, not a user error; otherwise (scores: original)
    the agreement is only reported. Returns (strings checked, strings that agree)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    slow = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    texts = [p.replace("▁", " ") for p in new_pieces]
    texts += ["".join(texts[i : i + 16]) for i in range(0, len(texts), 16)]
    fast_ids = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    slow_ids = slow.encode(texts)
    bad = [t for t, f, s in zip(texts, fast_ids, slow_ids) if f != s]
    if bad and exact:
        raise RuntimeError(
            f"fast tokenizer disagrees with SentencePiece on {len(bad)} of {len(texts)} strings, e.g. {bad[0]!r}"
        )
    if bad:
        log(
            f"scores: original: fast tokenizer == SentencePiece on {len(texts) - len(bad):,} of "
            f"{len(texts):,} probe strings (pieces with equal scores: SentencePiece merges the "
            "leftmost pair first, the fast tokenizer the higher-ranked one)"
        )
    else:
        log(f"fast tokenizer == SentencePiece on {len(texts):,} probe strings")
    return len(texts), len(texts) - len(bad)

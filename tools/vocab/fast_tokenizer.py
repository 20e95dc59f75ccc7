"""HF tokenizer directories for a SentencePiece BPE model, whose fast tokenizer encodes exactly as
SentencePiece does.

SentencePiece BPE encodes by repeatedly merging the adjacent pair whose concatenation is the
vocabulary piece with the highest score (leftmost on ties). A HF fast tokenizer applies a ranked
list of merges. transformers 5 ranks the merges it derives from a .model by piece *id*, and
LlamaTokenizer uses a Metaspace pre-tokenizer that adds no "▁" before leading spaces; both
disagree with SentencePiece (the LLaMA base already differs on runs of spaces, because its
whitespace pieces have low ids but score -1e9). So we write tokenizer.json ourselves: merges
ranked by SentencePiece score (then id), and SentencePiece's normalisation ("▁" prepended,
spaces -> "▁") instead of Metaspace. chla_tools.vocab.tokenizer_merge gives the pieces it
appends scores for which id order and score order agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chla_tools.hf_tokenizer import PORTABLE_CLASS

from .sp_model import CONTROL, UNKNOWN, mergeable, model_pb2


def build_fast_tokenizer(proto):
    """A `tokenizers.Tokenizer` that encodes exactly as SentencePiece BPE does with `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    ranked = []
    for piece_id, piece in enumerate(pieces):
        if not mergeable(piece):
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                # SentencePiece takes the highest score first; ids break ties in score.
                ranked.append((-piece.score, piece_id, cut, left, right))
    ranked.sort()
    unk = pieces[proto.trainer_spec.unk_id].piece
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=[(left, right) for *_, left, right in ranked],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
        )
    )
    # SentencePiece's add_dummy_prefix always prepends "▁"; Metaspace does not when the text
    # already starts with a space, so use plain normalizers instead.
    steps = []
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(decode)
    specials = [p.piece for p in pieces if p.type in (UNKNOWN, CONTROL)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = pieces[proto.trainer_spec.bos_id].piece if proto.trainer_spec.bos_id >= 0 else None
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
        )
    return tokenizer


def write_hf_tokenizer(
    model: bytes | str | os.PathLike[str], out_dir: str | os.PathLike[str], pad_token: str | None = None
) -> Path:
    """Write an HF tokenizer directory for a SentencePiece model (bytes or a .model path):
    tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    Loads with AutoTokenizer.from_pretrained in transformers 4 and 5 (chla_tools.hf_tokenizer says
    why the class is the generic fast tokenizer). BOS is added, EOS not, as LLaMA does.
    `pad_token` must already be a piece of the model.
    """
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    proto = model_pb2().ModelProto()
    proto.ParseFromString(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(data)
    build_fast_tokenizer(proto).save(str(out_dir / "tokenizer.json"))
    spec = proto.trainer_spec
    pieces = proto.pieces
    special = {
        "bos_token": pieces[spec.bos_id].piece,
        "eos_token": pieces[spec.eos_id].piece,
        "unk_token": pieces[spec.unk_id].piece,
    }
    if pad_token is not None:
        special["pad_token"] = pad_token
    config = {
        "tokenizer_class": PORTABLE_CLASS,
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "padding_side": "right",
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out_dir

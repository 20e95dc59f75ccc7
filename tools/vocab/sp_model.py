"""SentencePiece .model files: found behind a tokenizer path, parsed, and refused with one clear
line when they are something else (a tiktoken vocabulary, a tokenizer.json only)."""

from __future__ import annotations

import os
from pathlib import Path

from chla_launcher.contract.errors import ChlaError

# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def model_pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def load_sp_proto(path: str | os.PathLike[str], *, role: str = "tokenizer"):
    """Parse a SentencePiece .model file, refusing anything else with one clear line."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    data = path.read_bytes()
    proto = model_pb2().ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        proto = None
    if proto is None or len(proto.pieces) == 0:
        hint = ""
        if data[:200].count(b" ") and all(line.count(b" ") == 1 for line in data.splitlines()[:5]):
            hint = " (it looks like a tiktoken vocabulary, as Llama 3 ships)"
        raise ChlaError(
            f"{path}: {role} is not a SentencePiece model{hint}; chla vocab merge "
            "extends SentencePiece BPE tokenizers (LLaMA 1/2, Mistral v1) only"
        )
    return proto


def resolve_sp_model(base: str | os.PathLike[str], *, role: str = "base tokenizer") -> Path:
    """The tokenizer.model behind `base`: a .model file, an HF dir, or a dir holding tokenizer/."""
    base = Path(base)
    if not base.exists():
        raise ChlaError(f"{base}: {role} not found; pass an HF tokenizer directory or a .model file")
    if base.is_file():
        return base
    for candidate in (base / "tokenizer.model", base / "tokenizer" / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    if (base / "tokenizer.json").is_file() or (base / "tokenizer" / "tokenizer.json").is_file():
        raise ChlaError(
            f"{base}: {role} has only a tokenizer.json, not a SentencePiece tokenizer.model, and it is "
            "not a byte-level BPE; chla extends SentencePiece bases (LLaMA 1/2, Mistral v1) and "
            "byte-level BPE tokenizer.json bases (Llama 3, SmolLM, Qwen)"
        )
    raise ChlaError(
        f"{base}: no tokenizer in this directory (no tokenizer.model); "
        "pass the directory of an HF tokenizer or model, or the .model file"
    )


def mergeable(piece) -> bool:
    # SentencePiece's BPE merges into normal, user-defined and unused pieces, never into
    # control, unknown or byte pieces.
    return piece.type in (NORMAL, USER_DEFINED, UNUSED)

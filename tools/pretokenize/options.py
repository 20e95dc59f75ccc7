"""What a pretokenize run is asked to do: the options that change the ids (the cache key) and the
layout that only cuts the work, both taken from the `pretokenize` kind's params."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.pretokenize import PretokenizeParams

FORMAT_VERSION = "chla-pretokenized-v1"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    root = os.environ.get("CHLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chla")
    return Path(root) / "pretokenize"


@dataclass(frozen=True)
class PretokenizeOptions:
    """Everything that changes the produced ids (all of it goes into the cache key)."""

    text_format: str = "auto"  # auto (by suffix) | txt | jsonl | json
    txt_documents: str = "line"  # line | paragraph (blank-line separated)
    text_key: str = "text"
    append_eos: bool = True
    prepend_bos: bool = False
    encoder: str = "auto"  # auto | sentencepiece | hf
    # Documents longer than this many bytes are encoded in chunks (bounded memory).
    chunk_bytes: int = 1 << 20

    def key_fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: PretokenizeParams) -> PretokenizeOptions:
        """The params' fields of the same names (chunk_bytes, not a recipe key, keeps its default)."""
        return cls(**{f.name: getattr(params, f.name) for f in fields(cls) if f.name in type(params).model_fields})


@dataclass(frozen=True)
class Layout:
    """How the work is cut. Does not change the token stream, only shard boundaries."""

    piece_bytes: int = 16 << 20
    batch_bytes: int = 1 << 20

    @classmethod
    def from_params(cls, params: PretokenizeParams) -> Layout:
        return cls(piece_bytes=int(params.piece_mb * (1 << 20)))


# The `pretokenize` params that say what to read, where to write and how fast: they change no id,
# so they are not options and stay out of the cache key. Every other params field must be an
# option (tests/data/test_pretokenize.py checks), or a changed value would reuse stale ids.
NOT_OPTIONS = frozenset({"tokenizer", "inputs", "workers", "cache_dir", "piece_mb", "block_size"})

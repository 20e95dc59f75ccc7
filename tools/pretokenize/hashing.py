"""The content hashes of pre-tokenization: of source files (pieces read in blocks), tokenizer
files and shards. Below both the cache and the tokenizer description, which key on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

_HASH_BLOCK = 1 << 22


def blake(digest_size: int = 16) -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=digest_size)


def hash_file(path: Path, start: int = 0, end: int | None = None) -> str:
    """blake2b of bytes [start, end) of a file, read in blocks (a piece of a big file never whole)."""
    digest = blake()
    with open(path, "rb") as handle:
        handle.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            block = handle.read(_HASH_BLOCK if remaining is None else min(_HASH_BLOCK, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()

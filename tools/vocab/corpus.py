"""Corpus text files: streamed line by line, each checked to be UTF-8.

A corpus line that is not valid UTF-8 is an error naming the file and line (not skipped), so a
mis-encoded corpus (GBK, GB18030) is never half-used silently."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from chla_launcher.contract.errors import ChlaError


@dataclass
class CorpusStats:
    lines: int = 0
    chars: int = 0


def iter_corpus_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield the non-empty lines of a UTF-8 text file (without the newline), streaming."""
    path = Path(path)
    if not path.exists():
        raise ChlaError(f"{path}: corpus file not found; check the path")
    if not path.is_file():
        raise ChlaError(f"{path}: not a regular file; pass a text file, one sentence a line")
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ChlaError(
                    f"{path}:{number}: not valid UTF-8 (byte 0x{raw[error.start]:02x} at column "
                    f"{error.start + 1}); convert the file, e.g. `iconv -f GB18030 -t UTF-8`, "
                    "or remove the line"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            text = text.rstrip("\r\n")
            if text.strip():
                yield text


def check_corpora(paths: Sequence[str | os.PathLike[str]]) -> CorpusStats:
    """Validate every file (exists, UTF-8, not empty) and count lines and characters."""
    if not paths:
        raise ChlaError("no corpus files given; pass at least one text file")
    total = CorpusStats()
    for path in paths:
        stats = CorpusStats()
        for line in iter_corpus_lines(path):
            stats.lines += 1
            stats.chars += len(line)
        if stats.lines == 0:
            raise ChlaError(
                f"{path}: corpus file is empty (no non-blank lines); "
                "pass a file with text, one sentence or paragraph a line"
            )
        total.lines += stats.lines
        total.chars += stats.chars
    return total

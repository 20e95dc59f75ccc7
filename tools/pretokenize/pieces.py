"""The input files, cut into pieces (the cache units and shards) at document boundaries found
without reading whole files, the pieces' assignment to tasks, and the work items of one piece."""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chla_launcher.contract.errors import ChlaError

from .options import Layout, PretokenizeOptions

TEXT_SUFFIXES = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "json"}
# Where a too-long document may be cut (besides before a space): after these (UTF-8).
_CUT_MARKS = (b"\n", b"\t", "。".encode(), "，".encode(), "！".encode(), "？".encode(), "；".encode(), "、".encode())


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Globs -> sorted unique files. A pattern matching nothing is an error (a typo would
    otherwise silently drop data)."""
    if not patterns:
        raise ChlaError("pretokenize: no inputs given; pass --input GLOB (or `inputs:` in the recipe)")
    files: set[Path] = set()
    for pattern in patterns:
        matches = globlib.glob(os.path.expanduser(pattern), recursive=True)
        matched_files = [Path(m).resolve() for m in matches if os.path.isfile(m)]
        if not matched_files:
            raise ChlaError(f"pretokenize: input {pattern!r} matches no file; check the path or glob")
        files.update(matched_files)
    return sorted(files)


def file_format(path: Path, options: PretokenizeOptions) -> str:
    if options.text_format != "auto":
        return options.text_format
    fmt = TEXT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ChlaError(
            f"pretokenize: {path}: unknown input type {path.suffix!r}; use .txt, .jsonl or .json, or set text_format"
        )
    return fmt


def _is_blank(line: bytes) -> bool:
    return not line.strip()


def _line_start_at_or_after(handle, pos: int, end: int) -> int:
    if pos <= 0:
        return 0
    handle.seek(pos - 1)
    cursor = pos - 1
    while cursor < end:
        block = handle.read(min(1 << 16, end - cursor))
        if not block:
            break
        newline = block.find(b"\n")
        if newline >= 0:
            return min(cursor + newline + 1, end)
        cursor += len(block)
    return end


def next_document_start(handle, pos: int, end: int, fmt: str, txt_documents: str) -> int:
    """The first position >= pos where a document may start (`end` if none before it).

    Line formats: the start of a line. Paragraph format: the start of a line that follows a
    blank line. Reads in bounded windows, so a huge line costs a scan, never its size in memory."""
    line_start = _line_start_at_or_after(handle, pos, end)
    if not (fmt == "txt" and txt_documents == "paragraph"):
        return line_start
    while 0 < line_start < end:
        back = max(0, line_start - 4096)
        handle.seek(back)
        before = handle.read(line_start - back)
        previous_newline = before.rfind(b"\n", 0, len(before) - 1)
        if previous_newline >= 0 or back == 0:
            if _is_blank(before[previous_newline + 1 :]):
                return line_start
        line_start = _line_start_at_or_after(handle, line_start + 1, end)
    return line_start


def _chunk_cut(data: bytes) -> int:
    """A cut point in the last half of `data`: after whitespace/punctuation, else at a UTF-8
    character boundary."""
    half = len(data) // 2
    # Before a space (the next chunk then starts with " ", which SentencePiece turns into the
    # word-start "▁" exactly as in the whole text); after a newline, tab or CJK punctuation.
    best = data.rfind(b" ", half)
    for mark in _CUT_MARKS:
        found = data.rfind(mark, half)
        if found >= 0:
            best = max(best, found + len(mark))
    if best > 0:
        return best
    cut = len(data)
    while cut > 0 and (data[cut - 1] & 0xC0) == 0x80:
        cut -= 1
    if cut > 0 and data[cut - 1] >= 0xC0:  # a lead byte whose continuation was cut off
        cut -= 1
    return cut or len(data)


@dataclass(frozen=True)
class Piece:
    file_index: int
    piece_index: int
    path: str
    fmt: str
    nominal_start: int
    nominal_end: int

    @property
    def name(self) -> str:
        return f"shard-{self.file_index:05d}-{self.piece_index:05d}"


def plan_pieces(files: list[Path], options: PretokenizeOptions, layout: Layout) -> list[Piece]:
    pieces = []
    for file_index, path in enumerate(files):
        size = path.stat().st_size
        fmt = file_format(path, options)
        step = size if fmt == "json" else layout.piece_bytes
        for piece_index, start in enumerate(range(0, size, max(step, 1))):
            pieces.append(Piece(file_index, piece_index, str(path), fmt, start, min(size, start + step)))
    return pieces


def assign_pieces(pieces: list[Piece], num_tasks: int) -> list[list[Piece]]:
    """Contiguous runs of pieces, balanced by bytes: piece j goes to the task whose byte range
    holds the middle of j. Deterministic, and order-preserving across tasks."""
    total = sum(p.nominal_end - p.nominal_start for p in pieces) or 1
    tasks: list[list[Piece]] = [[] for _ in range(num_tasks)]
    before = 0
    for piece in pieces:
        size = piece.nominal_end - piece.nominal_start
        middle = before + size / 2
        tasks[min(num_tasks - 1, int(middle * num_tasks / total))].append(piece)
        before += size
    return tasks


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def work_items(
    path: str, fmt: str, txt_documents: str, start: int, end: int, batch_bytes: int, chunk_bytes: int
) -> Iterator[tuple]:
    """Work items for the worker processes, in stream order:
    ("docs", path, fmt, a, b) holds whole documents; ("chunk", path, fmt, a, b, first, last) is a
    part of one document longer than chunk_bytes (cut at whitespace/punctuation)."""
    if fmt in ("json", "jsonl"):  # a JSON record is parsed whole
        with open(path, "rb") as handle:
            cursor = start
            while cursor < end:
                stop = next_document_start(handle, min(end, cursor + batch_bytes), end, fmt, txt_documents)
                yield ("docs", path, fmt, cursor, stop, True, True)
                cursor = stop
        return
    with open(path, "rb") as handle:
        cursor = start
        while cursor < end:
            target = min(end, cursor + batch_bytes)
            stop = next_document_start(handle, target, end, fmt, txt_documents)
            if stop - cursor <= batch_bytes + chunk_bytes:
                yield ("docs", path, fmt, cursor, stop, True, True)
                cursor = stop
                continue
            # A document longer than chunk_bytes lies across `target`: first the whole documents
            # before it, then that document in chunks.
            handle.seek(cursor)
            window = handle.read(target - cursor)
            if txt_documents == "paragraph":
                blank_lines = list(_BLANK_LINE.finditer(window))
                last_start = cursor + blank_lines[-1].end() if blank_lines else cursor
            else:
                last_start = cursor + window.rfind(b"\n") + 1
            if last_start > cursor:
                yield ("docs", path, fmt, cursor, last_start, True, True)
                cursor = last_start
                continue
            doc_end = next_document_start(handle, cursor + 1, end, fmt, txt_documents)
            first = True
            while cursor < doc_end:
                handle.seek(cursor)
                data = handle.read(min(chunk_bytes, doc_end - cursor))
                cut = len(data) if cursor + len(data) >= doc_end else _chunk_cut(data)
                yield ("chunk", path, fmt, cursor, cursor + cut, first, cursor + cut >= doc_end)
                first = False
                cursor += cut

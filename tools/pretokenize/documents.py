"""The documents of a byte range (lines, paragraphs, JSONL or JSON records), with bad input counted
and its first place remembered rather than fatal."""

from __future__ import annotations

import json
from typing import Any

from chla_launcher.contract.errors import ChlaError

from .options import PretokenizeOptions


def new_bad_counts() -> dict[str, int]:
    return {
        "invalid_utf8_documents": 0,
        "invalid_json": 0,
        "not_an_object": 0,
        "missing_text_key": 0,
        "non_string_text": 0,
        "empty_documents": 0,
    }


def _decode(raw: bytes, bad: dict[str, int], where: dict) -> list[str]:
    """Lines of `raw` decoded; undecodable lines are decoded with U+FFFD and counted."""
    try:
        return raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for number, line in enumerate(raw.split(b"\n")):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad["invalid_utf8_documents"] += 1
                where.setdefault("invalid_utf8_documents", f"line {number + 1}")
                lines.append(line.decode("utf-8", errors="replace"))
        return lines


def _record_text(record: Any, key: str, bad: dict[str, int], where: dict, location: str) -> str | None:
    if not isinstance(record, dict):
        bad["not_an_object"] += 1
        where.setdefault("not_an_object", location)
        return None
    if key not in record:
        bad["missing_text_key"] += 1
        where.setdefault("missing_text_key", f"{location} (keys: {sorted(record)[:5]})")
        return None
    text = record[key]
    if not isinstance(text, str):
        bad["non_string_text"] += 1
        where.setdefault("non_string_text", f"{location} ({type(text).__name__})")
        return None
    return text


def documents_of(
    raw: bytes, fmt: str, options: PretokenizeOptions, bad: dict[str, int], where: dict, path: str
) -> list[str]:
    """Split a byte range holding whole documents into document texts."""
    if fmt == "json":
        try:
            records = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ChlaError(f"pretokenize: {path}: not valid UTF-8 JSON ({exc}); fix the file or use JSONL") from None
        if not isinstance(records, list):
            raise ChlaError(
                f"pretokenize: {path}: top level is a JSON {type(records).__name__}, expected a "
                f"list of objects with key {options.text_key!r}"
            )
        docs = []
        for index, record in enumerate(records):
            text = _record_text(record, options.text_key, bad, where, f"record {index}")
            if text is not None:
                docs.append(text)
    else:
        lines = _decode(raw, bad, where)
        if lines and lines[-1] == "":
            lines.pop()
        if fmt == "jsonl":
            docs = []
            for number, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    bad["invalid_json"] += 1
                    where.setdefault("invalid_json", f"line {number + 1}")
                    continue
                text = _record_text(record, options.text_key, bad, where, f"line {number + 1}")
                if text is not None:
                    docs.append(text)
        elif options.txt_documents == "paragraph":
            docs, current = [], []
            for line in lines:
                if line.strip():
                    current.append(line.rstrip("\r"))
                elif current:
                    docs.append("\n".join(current))
                    current = []
            if current:
                docs.append("\n".join(current))
        else:
            docs = [line.rstrip("\r") for line in lines]
    kept = [doc for doc in docs if doc.strip()]
    bad["empty_documents"] += len(docs) - len(kept) if fmt != "txt" else 0
    return kept

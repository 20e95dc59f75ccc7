"""Slurm's memory and time strings: validated as a recipe gives them, converted for sizing."""

from __future__ import annotations

import re

_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


def check_mem(value: str | None) -> str | None:
    if value is not None and not _MEM_RE.match(str(value)):
        raise ValueError(f"memory must look like 4G, 500M or 16GB (got {value!r})")
    return None if value is None else str(value).upper()


def check_time(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not _TIME_RE.match(text):
        raise ValueError(f"time must be minutes or [D-]HH:MM:SS (got {value!r})")
    return text


def time_to_minutes(text: str) -> int:
    """Slurm time string -> whole minutes (rounded up)."""
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = (parts + [0, 0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, minutes, seconds = 0, parts[0], parts[1]
        else:
            hours, minutes, seconds = parts
    total_seconds = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return max(1, -(-total_seconds // 60))


def mem_to_mb(text: str) -> int:
    match = re.match(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", text.upper())
    assert match, text
    number, unit = float(match.group(1)), match.group(2) or "M"
    return int(number * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit])

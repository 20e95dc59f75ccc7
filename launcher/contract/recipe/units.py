"""Slurm's memory and time strings: validated as a recipe gives them, converted for sizing.

Both are matched whole (fullmatch: a `$` would let a trailing newline reach `#SBATCH`) and bounded
by what Slurm accepts: memory is a 64-bit count of megabytes (sbatch refuses --mem=2^63 M), a time
limit a 32-bit count of minutes (Slurm's time parsing is in C ints; 2^31 - 1 minutes is 4,085
years)."""

from __future__ import annotations

import re
from fractions import Fraction

MAX_MEM_MB = 2**63 - 1
MAX_TIME_MINUTES = 2**31 - 1
_MEM_RE = re.compile(r"(\d{1,20})(\.\d{1,9})?([KMGT]?)B?", re.IGNORECASE)
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME_RE = re.compile(r"(\d{1,10}-)?\d{1,10}(:\d{1,2}){0,2}")
_UNIT_MB = {"K": Fraction(1, 1024), "M": Fraction(1), "G": Fraction(1024), "T": Fraction(1024**2)}


def check_mem(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not _MEM_RE.fullmatch(text):
        raise ValueError(f"memory must look like 4G, 500M or 16GB (got {value!r})")
    if mem_to_mb(text) > MAX_MEM_MB:
        raise ValueError(f"memory {value!r} is beyond Slurm's limit of {MAX_MEM_MB:,} MB (64 bits)")
    return text.upper()


def check_time(value: str | int | None) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not _TIME_RE.fullmatch(text):
        raise ValueError(f"time must be minutes or [D-]HH:MM:SS (got {value!r})")
    if time_to_minutes(text) > MAX_TIME_MINUTES:
        raise ValueError(f"time {value!r} is beyond Slurm's limit of {MAX_TIME_MINUTES:,} minutes (32 bits)")
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
    """Slurm memory string -> whole megabytes (rounded down), computed exactly."""
    match = _MEM_RE.fullmatch(text)
    assert match, text
    number = Fraction(match.group(1) + (match.group(2) or ""))
    return int(number * _UNIT_MB[(match.group(3) or "M").upper()])

"""Where the vocabulary steps report progress: a job's log (StageContext.log) or the terminal."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


def print_line(message: str) -> None:
    print(message, flush=True)

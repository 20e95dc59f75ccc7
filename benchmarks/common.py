"""What several benchmark scripts share besides their machine line (machine.py): the `--run`
argument of those that measure a finished demo-like run, the `--keep DIR` work directory and the
table of step timings of those that time a chain of steps, and how a process that ran gloo ends.

Usage from a benchmark script (benchmarks/ is the script's own directory, so it is importable):
    from common import demo_run_parser
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


def demo_run_parser(doc: str, run_help: str = "run directory of a finished demo-like chain") -> argparse.ArgumentParser:
    """A benchmark's parser, described by its docstring's first line, with `--run DIR` (a Path)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help=run_help)
    return parser


def parse_with_work_dir(parser: argparse.ArgumentParser, prefix: str) -> tuple[argparse.Namespace, Path]:
    """Parse a benchmark's command line with `--keep DIR` added; returns the arguments and the
    directory to write the outputs to: --keep's, else a new temporary directory named `prefix`...
    (print_timings_and_outputs removes that one at the end)."""
    import tempfile

    parser.add_argument("--keep", metavar="DIR", help="write outputs here instead of a temp dir")
    args = parser.parse_args()
    return args, Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=prefix))


def resize_to_merged_tokenizer(model, tokenizer, *, new_row_init: str, tokenizer_dir, seed: int) -> int:
    """The base model resized to the merged tokenizer's rows, as a pretraining stage does it (its
    new rows started by `new_row_init`); returns the base's row count."""
    from chla_train import model as models

    return models.resize_to_tokenizer(
        model,
        len(tokenizer),
        new_row_init=new_row_init,
        max_vocab_growth=4.0,
        where="benchmark",
        tokenizer_dir=str(tokenizer_dir),
        seed=seed,
        log=quiet,
    )


def quiet(message: str) -> None:
    """A `log` that prints nothing: the timed steps' own progress lines would bury the table."""


def print_timings_and_outputs(timings: dict[str, float], report: str, work: Path, keep: bool) -> None:
    """The wall seconds of each step (a markdown table), then `report`, then where the outputs
    are; they are removed unless the user asked to keep them."""
    import shutil

    width = max(map(len, timings))
    print(f"| {'step':<{width}} | wall s |\n|{'-' * (width + 2)}|-------:|")
    for step, seconds in timings.items():
        print(f"| {step:<{width}} | {seconds:6.2f} |")
    print()
    print(report)
    print(f"outputs: {work}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


def exit_skipping_teardown() -> NoReturn:
    """End the process here, its output flushed, skipping the interpreter's teardown: with gloo's
    threads still alive it can abort (SIGABRT) a process that has written all it measured."""
    sys.stdout.flush()
    os._exit(0)

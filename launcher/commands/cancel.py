"""`chla cancel RUN_DIR`: stop a whole chain."""

from __future__ import annotations

import argparse

NAME = "cancel"
HELP = "cancel every queued or running job of a run"
ORDER = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")


def run(args: argparse.Namespace) -> int:
    from chla_launcher.logs import cancel_run

    return cancel_run(args.run_dir)

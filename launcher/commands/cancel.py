"""`chla cancel RUN_DIR`: stop a whole chain."""

from __future__ import annotations

import argparse

from chla_launcher.remote import add_remote_arguments

NAME = "cancel"
HELP = "cancel every queued or running job of a run"
ORDER = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.remote import options_from_args

    remote = options_from_args(args)
    if remote is not None:
        from chla_launcher.remote import remote_chla

        return remote_chla(remote, ["cancel", args.run_dir])
    from chla_launcher.logs import cancel_run

    return cancel_run(args.run_dir)

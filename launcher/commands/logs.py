"""`chla logs RUN_DIR STAGE`: a stage's job output."""

from __future__ import annotations

import argparse

from chla_launcher.remote import add_remote_arguments

NAME = "logs"
HELP = "print a stage's log (one task), optionally following it"
ORDER = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir")
    parser.add_argument("stage")
    parser.add_argument("--task", type=int, default=0, help="array task index (default 0)")
    parser.add_argument("--rank", type=int, default=0, help="rank of a distributed stage (default 0)")
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows")
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.remote import options_from_args

    remote = options_from_args(args)
    if remote is not None:
        from chla_launcher.remote import remote_chla

        argv = ["logs", args.run_dir, args.stage, "--task", str(args.task), "--rank", str(args.rank)]
        return remote_chla(remote, argv + (["--follow"] if args.follow else []))
    from chla_launcher.logs import show_logs

    return show_logs(args.run_dir, args.stage, task=args.task, rank=args.rank, follow=args.follow)

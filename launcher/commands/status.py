"""`chla status RUN_DIR`: the state of every stage of a run."""

from __future__ import annotations

import argparse

from chla_launcher.remote import add_remote_arguments

NAME = "status"
HELP = "show the state of every stage of a run (one sacct call per refresh)"
ORDER = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory (runs/<name>)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--watch",
        nargs="?",
        const=5.0,
        type=float,
        metavar="SECONDS",
        help="refresh until every stage has ended (default every 5 s)",
    )
    add_remote_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time

    from chla_launcher.remote import options_from_args

    remote = options_from_args(args)
    if remote is not None:
        from chla_launcher.remote import remote_chla

        argv = ["status", args.run_dir] + (["--json"] if args.json else [])
        if args.watch is not None:
            argv += ["--watch", str(args.watch)]
        return remote_chla(remote, argv)
    from chla_launcher.contract.rundir import RunDir
    from chla_launcher.status import all_terminal, as_json, collect, render_status

    run_dir = RunDir(args.run_dir)
    while True:
        statuses = collect(run_dir)
        if args.json:
            print(json.dumps(as_json(statuses), indent=2, ensure_ascii=False))
        else:
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")
            render_status(run_dir, statuses=statuses)
        if not args.watch or all_terminal(statuses):
            break
        time.sleep(max(1.0, args.watch))
    failed = [s for s in statuses if s.state in ("FAILED", "CANCELLED", "INTERRUPTED")]
    return 1 if failed else 0

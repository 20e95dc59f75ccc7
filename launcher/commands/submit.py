"""`chla submit` (also `chla-submit`): queue a recipe's chain, or run it locally."""

from __future__ import annotations

import argparse

from chla_launcher.flags import add_override_flag
from chla_launcher.remote import RemoteOptions, add_remote_arguments

NAME = "submit"
HELP = "submit a recipe's stage chain (Slurm, detached) or run it on this machine (local)"
ORDER = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (optional with --resume)")
    add_override_flag(parser, "override any recipe key, e.g. --set stages.pt.resources.nodes=4 (repeatable)")
    from chla_launcher.contract.executor_registry import executor_names

    parser.add_argument("--executor", choices=executor_names(), help="override the recipe's executor")
    parser.add_argument("--run-dir", help="run directory (default: the recipe's run_dir, else runs/<name>)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="re-run the failed or unfinished stages of RUN_DIR and their dependents; uses "
        "RUN_DIR's frozen recipe unless a recipe file is given",
    )
    parser.add_argument("--only", help="comma-separated stages to run (their inputs must be finished)")
    parser.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help="run STAGE and everything after it, even if finished"
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="if the run directory's chain is still queued or running, cancel it first "
        "(without it, such a submission is refused)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="refuse to queue anything when a training stage will not fit in its devices' "
        "memory (chla plan); without it, a warning",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and every sbatch script exactly as it would be submitted; submit and write nothing",
    )
    add_remote_arguments(parser, snapshot=True)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.remote import options_from_args

    remote = options_from_args(args)
    if remote is not None:
        return _run_remote(args, remote)
    from chla_launcher.submit import SubmitOptions, submit

    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    options = SubmitOptions(
        recipe=args.recipe,
        overrides=args.overrides,
        executor=args.executor,
        run_dir=args.run_dir,
        resume=args.resume,
        only=only,
        from_stage=args.from_stage,
        dry_run=args.dry_run,
        replace=args.replace,
        strict=args.strict,
    )
    return submit(options)


def _run_remote(args: argparse.Namespace, remote: RemoteOptions) -> int:
    """Upload the recipe and run `chla submit` on the login node with the same flags. Paths in the
    flags (--run-dir, --resume) are paths on the remote side, relative to the remote directory."""
    from chla_launcher.remote import remote_submit

    forwarded: list[str] = []
    for override in args.overrides:
        forwarded += ["--set", override]
    for flag, value in (
        ("--executor", args.executor),
        ("--run-dir", args.run_dir),
        ("--resume", args.resume),
        ("--only", args.only),
        ("--from", args.from_stage),
    ):
        if value is not None:
            forwarded += [flag, value]
    for flag, value in (("--dry-run", args.dry_run), ("--replace", args.replace), ("--strict", args.strict)):
        if value:
            forwarded.append(flag)
    return remote_submit(remote, args.recipe, forwarded)

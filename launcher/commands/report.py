"""`chla report <what> ...`: plots from a run directory. One sub-subcommand per report, each
registered in REPORTS below (`train` here; others add their own entry)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

NAME = "report"
HELP = "reports from a run directory: train (loss curves), scaling (node-scaling sweep)"
ORDER = 80


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (runs/<name>)")
    parser.add_argument(
        "--out", metavar="PNG", default=None, help="output image (default RUN_DIR/reports/train_loss.png)"
    )


def _run_train(args: argparse.Namespace) -> int:
    from chla_tools.train_report import train_report

    path = train_report(args.run_dir, args.out)
    print(path)
    return 0


def _add_scaling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of a recipe with a `sweep:`")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output directory (default RUN_DIR/reports): scaling.md, scaling.json, scaling-<stage>.png",
    )


def _run_scaling(args: argparse.Namespace) -> int:
    from chla_tools.scaling_report import markdown, scaling_report

    print(markdown(scaling_report(args.run_dir, args.out)))
    return 0


# name -> (help, add_arguments, run). Add a report by adding an entry.
REPORTS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("loss curves of every training stage of a run in one PNG", _add_train, _run_train),
    "scaling": (
        "throughput, speedup and efficiency of a node-scaling sweep (table and PNG)",
        _add_scaling,
        _run_scaling,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="report", metavar="REPORT", required=True)
    for name, (help_text, add, _) in REPORTS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return REPORTS[args.report][2](args)

"""`chla merge`: merge LoRA adapters into a base model without loading it whole. Its flags are the
`merge` kind's params (chla_launcher.contract.kinds.merge)."""

from __future__ import annotations

import argparse

from ..contract.kinds.merge import MergeParams
from ..flags import Flag, ParamFlags

NAME = "merge"
HELP = "merge LoRA adapters (in order) into a base model, tensor by tensor"
ORDER = 60

FLAGS = ParamFlags(MergeParams, (Flag("base", metavar="DIR"), Flag("adapters", name="--adapter", metavar="DIR")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory (replaced atomically)")
    FLAGS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    from chla_tools.merge import merge_with_params

    merge_with_params(FLAGS.params(args), args.out)
    return 0

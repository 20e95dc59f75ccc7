"""`chla merge`: merge LoRA adapters into a base model without loading it whole. Its flags are the
`merge` kind's params (chla_launcher.kinds.merge)."""

from __future__ import annotations

import argparse

from ..flags import Flag, add_param_flags, params_from_flags
from ..kinds.merge import MergeParams

NAME = "merge"
HELP = "merge LoRA adapters (in order) into a base model, tensor by tensor"
ORDER = 60

FLAGS: list[Flag | str] = [Flag("base", metavar="DIR"), Flag("adapters", name="--adapter", metavar="DIR"), "shard_size", "dtype"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory (replaced atomically)")
    add_param_flags(parser, MergeParams, FLAGS)


def run(args: argparse.Namespace) -> int:
    from chla_tools.merge import merge_with_params

    merge_with_params(params_from_flags(MergeParams, args, FLAGS), args.out)
    return 0

"""`chla plan RECIPE [--set ...]`: per-device memory of every training stage, before queueing it."""

from __future__ import annotations

import argparse
import sys

from ..flags import add_override_flag

NAME = "plan"
HELP = (
    "memory per device of every training stage (weights, gradients, optimizer states, activations) "
    "against its GPUs, from config.json sizes; loads no model"
)
ORDER = 15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    add_override_flag(parser, "override any recipe key, as for chla submit (repeatable)")
    from chla_launcher.architectures import ARCHITECTURES  # a dict: no cost to `chla --help`

    parser.add_argument(
        "--arch",
        choices=sorted(ARCHITECTURES),
        help="size base models whose config.json is not there (not downloaded yet) as this published "
        "architecture; a config.json that is there wins",
    )


def run(args: argparse.Namespace) -> int:
    from chla_launcher.contract.recipe import load_recipe
    from chla_launcher.plan import plan_recipe, render

    # Inputs need not exist yet: planning reads only the model configs and tokenizers it finds.
    recipe = load_recipe(args.recipe, args.overrides, check_inputs=False)
    render(plan_recipe(recipe, arch=args.arch), sys.stdout)
    return 0

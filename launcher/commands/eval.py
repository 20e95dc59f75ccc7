"""`chla eval`: batch evaluation on this machine (shards run one after another, then aggregated).
Its flags are the `evaluate` kind's params (chla_launcher.kinds.evaluate)."""

from __future__ import annotations

import argparse

from ..flags import Flag, add_param_flags, params_from_flags
from ..kinds.evaluate import EvaluateParams

NAME = "eval"
HELP = "evaluate a model: perplexity per token/char, task scores beside baselines, generations for prompts"
ORDER = 64

FLAGS: list[Flag | str] = [
    Flag("model", metavar="DIR"),
    Flag("adapters", name="--adapter", metavar="DIR"),
    Flag("ppl", metavar="FILE"),
    Flag("tasks", name="--task", metavar="FILE"),
    Flag("prompts", metavar="FILE"),
    "batch_size",
    "max_new_tokens",
    "block_size",
    Flag("template", name="--no-template"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="results directory (replaced atomically)")
    parser.add_argument("--shards", type=int, default=1, help="split the items as an array stage would (default 1)")
    add_param_flags(parser, EvaluateParams, FLAGS)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.errors import ChlaError
    from chla_tools.evaluate import evaluate

    if not (args.ppl or args.tasks or args.prompts):
        raise ChlaError("nothing to evaluate: give at least one --ppl, --task or --prompts file")
    params = params_from_flags(EvaluateParams, args, FLAGS)
    evaluate(params.model, params.adapters, args.out, ppl=params.ppl, tasks=params.tasks, prompts=params.prompts,
             shards=args.shards, batch_size=params.batch_size, max_new_tokens=params.max_new_tokens,
             block_size=params.block_size, template=params.template)
    return 0

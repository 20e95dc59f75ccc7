"""`chla eval`: batch evaluation on this machine (shards run one after another, then aggregated).
Its flags are the `evaluate` kind's params (chla_launcher.contract.kinds.evaluate)."""

from __future__ import annotations

import argparse

from ..contract.kinds.evaluate import EvaluateParams
from ..flags import Flag, ParamFlags

NAME = "eval"
HELP = "evaluate a model: perplexity per token/char, task scores beside baselines, generations for prompts"
ORDER = 64

# lm_eval and vllm are nested settings (a recipe's), and backend vllm needs a GPU node's vLLM.
FLAGS = ParamFlags(
    EvaluateParams,
    (
        Flag("model", metavar="DIR"),
        Flag("adapters", name="--adapter", metavar="DIR"),
        Flag("ppl", metavar="FILE"),
        Flag("tasks", name="--task", metavar="FILE"),
        Flag("prompts", metavar="FILE"),
    ),
    exclude=frozenset({"lm_eval", "backend", "vllm"}),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="results directory (replaced atomically)")
    parser.add_argument("--shards", type=int, default=1, help="split the items as an array stage would (default 1)")
    FLAGS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.contract.errors import ChlaError
    from chla_tools.evaluate import evaluate

    if not (args.ppl or args.tasks or args.prompts):
        raise ChlaError("nothing to evaluate: give at least one --ppl, --task or --prompts file")
    evaluate(FLAGS.params(args), args.out, shards=args.shards)
    return 0

"""`chla eval`: batch evaluation on this machine (shards run one after another, then aggregated)."""

from __future__ import annotations

import argparse

NAME = "eval"
HELP = "evaluate a model: perplexity per token/char, task scores beside baselines, generations for prompts"
ORDER = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF model directory (merged, or the base)")
    parser.add_argument("--adapter", dest="adapters", action="append", default=[], metavar="DIR",
                        help="peft LoRA adapter applied on top (repeat, in training order)")
    parser.add_argument("--ppl", action="append", default=[], metavar="FILE",
                        help="held-out text, one paragraph a line: perplexity per token and per character")
    parser.add_argument("--task", dest="tasks", action="append", default=[], metavar="FILE",
                        help="Alpaca-format labelled file, scored by its records' `task` (sentiment: accuracy, "
                             "segmentation: word F1, entities: entity F1, continuation: ROUGE-L) beside "
                             "baselines, else by exact match after greedy generation")
    parser.add_argument("--prompts", action="append", default=[], metavar="FILE",
                        help='JSONL {"prompt": ...} or Alpaca file: generations written as JSONL')
    parser.add_argument("--out", required=True, metavar="DIR", help="results directory (replaced atomically)")
    parser.add_argument("--shards", type=int, default=1, help="split the items as an array stage would (default 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="default %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation length (default: each task's own; 64 for prompts and untyped files)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="perplexity window in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--no-template", dest="template", action="store_false",
                        help="use instructions/prompts as they are, without the Alpaca template")


def run(args: argparse.Namespace) -> int:
    from chla_launcher.errors import ChlaError
    from chla_tools.evaluate import evaluate

    if not (args.ppl or args.tasks or args.prompts):
        raise ChlaError("nothing to evaluate: give at least one --ppl, --task or --prompts file")
    evaluate(args.model, args.adapters, args.out, ppl=args.ppl, tasks=args.tasks, prompts=args.prompts,
             shards=args.shards, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
             block_size=args.block_size, template=args.template)
    return 0

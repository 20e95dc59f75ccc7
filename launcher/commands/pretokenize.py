"""`chla pretokenize`: run every shard of a pretokenize job on this machine, then the manifest.
Its flags are the `pretokenize` kind's params (chla_launcher.contract.kinds.pretokenize)."""

from __future__ import annotations

import argparse

from ..contract.kinds.pretokenize import PretokenizeParams
from ..flags import Flag, ParamFlags

NAME = "pretokenize"
HELP = "tokenize a text corpus into memory-mapped token shards (cached by content)"
ORDER = 30

FLAGS = ParamFlags(
    PretokenizeParams,
    (
        Flag("tokenizer", metavar="DIR"),
        Flag("inputs", name="--input", metavar="GLOB"),
        Flag("text_format", name="--format"),
        Flag("append_eos", name="--no-eos"),
        Flag("prepend_bos", name="--bos"),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    parser.add_argument(
        "--shards", type=int, default=1, help="number of tasks the work is divided into (as an array stage would)"
    )
    FLAGS.add_to(parser)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.contract.errors import ChlaError
    from chla_tools.pretokenize import pretokenize_with_params

    if args.shards < 1:
        raise ChlaError("pretokenize: --shards must be >= 1")
    params = FLAGS.params(args)
    result = pretokenize_with_params(params, args.out, num_shards=args.shards)
    print(
        f"{args.out}: {result['tokens']:,} tokens, {result['documents']:,} documents in {result['shards']} "
        f"shards ({result['pieces_tokenized']} pieces tokenized, {result['pieces_cached']} from cache)"
    )
    return 0

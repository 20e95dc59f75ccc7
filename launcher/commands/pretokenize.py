"""`chla pretokenize`: run every shard of a pretokenize job on this machine, then the manifest.
Its flags are the `pretokenize` kind's params (chla_launcher.kinds.pretokenize)."""

from __future__ import annotations

import argparse

from ..flags import Flag, add_param_flags, params_from_flags
from ..kinds.pretokenize import PretokenizeParams

NAME = "pretokenize"
HELP = "tokenize a text corpus into memory-mapped token shards (cached by content)"
ORDER = 30

FLAGS: list[Flag | str] = [
    Flag("tokenizer", metavar="DIR"),
    Flag("inputs", name="--input", metavar="GLOB"),
    "workers",
    "cache_dir",
    Flag("text_format", name="--format"),
    "txt_documents",
    "text_key",
    Flag("append_eos", name="--no-eos"),
    Flag("prepend_bos", name="--bos"),
    "encoder",
    "block_size",
    "piece_mb",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    parser.add_argument("--shards", type=int, default=1,
                        help="number of tasks the work is divided into (as an array stage would)")
    add_param_flags(parser, PretokenizeParams, FLAGS)


def run(args: argparse.Namespace) -> int:
    from chla_launcher.errors import ChlaError
    from chla_tools.pretokenize import pretokenize_with_params

    if args.shards < 1:
        raise ChlaError("pretokenize: --shards must be >= 1")
    params = params_from_flags(PretokenizeParams, args, FLAGS)
    result = pretokenize_with_params(params, args.out, num_shards=args.shards)
    print(f"{args.out}: {result['tokens']:,} tokens, {result['documents']:,} documents in {result['shards']} "
          f"shards ({result['pieces_tokenized']} pieces tokenized, {result['pieces_cached']} from cache)")
    return 0

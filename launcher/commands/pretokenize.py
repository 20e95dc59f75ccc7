"""`chla pretokenize`: run every shard of a pretokenize job on this machine, then the manifest."""

from __future__ import annotations

import argparse

NAME = "pretokenize"
HELP = "tokenize a text corpus into memory-mapped token shards (cached by content)"
ORDER = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer directory")
    parser.add_argument("--input", dest="inputs", nargs="+", action="extend", required=True,
                        metavar="GLOB", help=".txt/.jsonl/.json files or globs (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (shards + manifest.json)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--shards", type=int, default=1,
                        help="number of tasks the work is divided into (as an array stage would)")
    parser.add_argument("--cache-dir", default=None,
                        help="content-addressed cache (default $CHLA_CACHE/pretokenize or ~/.cache/chla/pretokenize)")
    parser.add_argument("--format", dest="text_format", choices=["auto", "txt", "jsonl", "json"], default="auto")
    parser.add_argument("--txt-documents", choices=["line", "paragraph"], default="line",
                        help=".txt: a document a line (default) or blank-line separated")
    parser.add_argument("--text-key", default="text", help="key of the text in JSON records")
    parser.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    parser.add_argument("--bos", action="store_true", help="prepend BOS to each document")
    parser.add_argument("--encoder", choices=["auto", "sentencepiece", "hf"], default="auto")
    parser.add_argument("--block-size", type=int, default=None, help="recorded in the manifest")
    parser.add_argument("--piece-mb", type=float, default=16, help="piece size of the file split (MB)")


def run(args: argparse.Namespace) -> int:
    from chla_launcher.errors import ChlaError
    from chla_tools.pretokenize import Layout, PretokenizeOptions, pretokenize

    if args.shards < 1 or (args.workers is not None and args.workers < 1):
        raise ChlaError("pretokenize: --shards and --workers must be >= 1")
    options = PretokenizeOptions(text_format=args.text_format, txt_documents=args.txt_documents,
                                 text_key=args.text_key, append_eos=not args.no_eos,
                                 prepend_bos=args.bos, encoder=args.encoder)
    result = pretokenize(args.inputs, args.tokenizer, args.out, num_shards=args.shards, workers=args.workers,
                         options=options, layout=Layout(piece_bytes=int(args.piece_mb * (1 << 20))),
                         cache_dir=args.cache_dir, block_size=args.block_size)
    print(f"{args.out}: {result['tokens']:,} tokens, {result['documents']:,} documents in {result['shards']} "
          f"shards ({result['pieces_tokenized']} pieces tokenized, {result['pieces_cached']} from cache)")
    return 0

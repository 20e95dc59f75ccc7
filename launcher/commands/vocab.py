"""`chla vocab train|merge|report`: Chinese SentencePiece training, tokenizer merge, efficiency report."""

from __future__ import annotations

import argparse
from typing import get_args

from ..kinds.merge_tokenizer import MergeTokenizerParams

NAME = "vocab"
HELP = "extend a tokenizer: train a SentencePiece model, merge it into a base, report efficiency"
ORDER = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)

    train = sub.add_parser("train", help="train a SentencePiece model (writes DIR/spm.model)",
                           description="train a SentencePiece model with the original project's "
                                       "settings (BPE, coverage 0.9995, digits split)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="UTF-8 text files, one sentence or paragraph a line")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument("--character-coverage", type=float, default=0.9995, metavar="F")
    train.add_argument("--threads", type=int, default=None, metavar="N",
                       help="trainer threads (default: all cores)")
    train.add_argument("--input-sentence-size", type=int, default=2_000_000, metavar="N",
                       help="lines sampled from the inputs (default: 2,000,000)")
    train.add_argument("--max-sentence-length", type=int, default=16384, metavar="BYTES")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, metavar="DIR")

    merge = sub.add_parser("merge", help="merge a SentencePiece model into a base tokenizer",
                           description="append the new pieces of --add to --base (base ids "
                                       "unchanged); writes DIR/merged.model and DIR/tokenizer/")
    merge.add_argument("--base", required=True, metavar="TOKENIZER",
                       help="HF tokenizer directory with tokenizer.model, or a .model file")
    merge.add_argument("--add", required=True, metavar="SP_MODEL",
                       help="SentencePiece model to add (e.g. from `chla vocab train`)")
    merge.add_argument("--pad-token", action="store_true",
                       help="append exactly one [PAD] token (the SFT variant)")
    scores = MergeTokenizerParams.model_fields["scores"]
    merge.add_argument("--scores", choices=get_args(scores.annotation), default=scores.default,
                       help=f"{scores.description} (default: {scores.default})")
    merge.add_argument("--out", required=True, metavar="DIR")

    report = sub.add_parser("report", help="tokens/char etc. per tokenizer x corpus",
                            description="write report.json, report.md and report.png; the first "
                                        "--tokenizer is the baseline")
    report.add_argument("--tokenizer", nargs="+", action="extend", required=True,
                        metavar="NAME=DIR")
    report.add_argument("--corpus", nargs="+", action="extend", required=True, metavar="NAME=FILE")
    report.add_argument("--out", required=True, metavar="DIR")


def run(args: argparse.Namespace) -> int:
    from chla_tools import vocab

    if args.vocab_command == "train":
        vocab.train_spm(args.input, args.out, vocab_size=args.vocab_size,
                        model_type=args.model_type, character_coverage=args.character_coverage,
                        threads=args.threads, input_sentence_size=args.input_sentence_size,
                        max_sentence_length=args.max_sentence_length, seed=args.seed)
    elif args.vocab_command == "merge":
        vocab.merge_tokenizers(args.base, args.add, args.out, pad_token=args.pad_token,
                               scores=args.scores)
    else:
        report = vocab.vocab_report(vocab.parse_named(args.tokenizer, "tokenizer"),
                                    vocab.parse_named(args.corpus, "corpus"), args.out)
        print(vocab.render_markdown(report, next(iter(report["tokenizers"]))), end="")
    return 0

"""`chla vocab train|merge|report`: Chinese SentencePiece training, tokenizer merge, efficiency report."""

from __future__ import annotations

import argparse

from ..flags import Flag, ParamFlags
from ..kinds.merge_tokenizer import MergeTokenizerParams
from ..kinds.train_spm import TrainSpmParams

NAME = "vocab"
HELP = "extend a tokenizer: train a SentencePiece model, merge it into a base, report efficiency"
ORDER = 50

# The flags of `train` and `merge` are the train_spm and merge_tokenizer kinds' params.
TRAIN_FLAGS = ParamFlags(
    TrainSpmParams,
    (
        Flag("inputs", name="--input", metavar="FILE"),
        Flag("vocab_size", metavar="N"),
        Flag("character_coverage", metavar="F"),
        Flag("threads", metavar="N"),
        Flag("input_sentence_size", metavar="N"),
        Flag("max_sentence_length", metavar="BYTES"),
    ),
)
MERGE_FLAGS = ParamFlags(MergeTokenizerParams, (Flag("base", metavar="TOKENIZER"), Flag("add", metavar="SP_MODEL")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)

    train = sub.add_parser(
        "train",
        help="train a SentencePiece model (writes DIR/spm.model)",
        description="train a SentencePiece model with the original project's "
        "settings (BPE, coverage 0.9995, digits split)",
    )
    TRAIN_FLAGS.add_to(train)
    train.add_argument("--out", required=True, metavar="DIR")

    merge = sub.add_parser(
        "merge",
        help="merge a SentencePiece model into a base tokenizer",
        description="append the new pieces of --add to --base (base ids "
        "unchanged); writes DIR/merged.model and DIR/tokenizer/",
    )
    MERGE_FLAGS.add_to(merge)
    merge.add_argument("--out", required=True, metavar="DIR")

    report = sub.add_parser(
        "report",
        help="tokens/char etc. per tokenizer x corpus",
        description="write report.json, report.md and report.png; the first --tokenizer is the baseline",
    )
    report.add_argument("--tokenizer", nargs="+", action="extend", required=True, metavar="NAME=DIR")
    report.add_argument("--corpus", nargs="+", action="extend", required=True, metavar="NAME=FILE")
    report.add_argument("--out", required=True, metavar="DIR")


def run(args: argparse.Namespace) -> int:
    from chla_tools import vocab

    if args.vocab_command == "train":
        vocab.train_spm_with_params(TRAIN_FLAGS.params(args), args.out)
    elif args.vocab_command == "merge":
        vocab.merge_tokenizers_with_params(MERGE_FLAGS.params(args), args.out)
    else:
        report = vocab.vocab_report(
            vocab.parse_named(args.tokenizer, "tokenizer"), vocab.parse_named(args.corpus, "corpus"), args.out
        )
        print(vocab.render_markdown(report, next(iter(report["tokenizers"]))), end="")
    return 0

"""`chla vocab train|train-bpe|merge|report`: Chinese SentencePiece or byte-level BPE training,
tokenizer merge, efficiency report."""

from __future__ import annotations

import argparse

from ..contract.errors import ChlaError
from ..contract.kinds.merge_tokenizer import MergeTokenizerParams
from ..contract.kinds.train_bpe import TrainBpeParams
from ..contract.kinds.train_spm import TrainSpmParams
from ..contract.kinds.vocab_report import VocabReportParams
from ..flags import Flag, ParamFlags, add_action

NAME = "vocab"
HELP = "extend a tokenizer: train a Chinese SentencePiece model or BPE, merge it into a base, report efficiency"
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
TRAIN_BPE_FLAGS = ParamFlags(
    TrainBpeParams,
    (
        Flag("inputs", name="--input", metavar="FILE"),
        Flag("base", metavar="TOKENIZER"),
        Flag("merges", metavar="N"),
        Flag("min_frequency", metavar="N"),
    ),
)
MERGE_FLAGS = ParamFlags(MergeTokenizerParams, (Flag("base", metavar="TOKENIZER"), Flag("add", metavar="MODEL")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    train = "train a SentencePiece model with the original project's settings (BPE, coverage 0.9995, digits split)"
    add_action(sub, "train", "train a SentencePiece model (writes DIR/spm.model)", train, TRAIN_FLAGS.add_to)
    train_bpe = (
        "train a byte-level BPE for a byte-level BPE base (Llama 3, SmolLM, Qwen) with the base's own "
        "pre-tokenizer and byte alphabet"
    )
    add_action(
        sub, "train-bpe", "train a byte-level BPE (writes DIR/tokenizer.json)", train_bpe, TRAIN_BPE_FLAGS.add_to
    )
    merge = (
        "append the new pieces of --add to --base (base ids unchanged); writes DIR/tokenizer/ (and "
        "DIR/merged.model for a SentencePiece base). A byte-level BPE base takes a train-bpe DIR as --add"
    )
    add_action(sub, "merge", "merge a trained Chinese tokenizer into a base tokenizer", merge, MERGE_FLAGS.add_to)
    report = "write report.json, report.md and report.png; the first --tokenizer is the baseline"
    add_action(sub, "report", "tokens/char etc. per tokenizer x corpus", report, _add_report_flags)


def _add_report_flags(parser: argparse.ArgumentParser) -> None:
    # The vocab_report kind's params are mappings, given here as NAME=PATH pairs.
    parser.add_argument("--tokenizer", nargs="+", action="extend", required=True, metavar="NAME=DIR")
    parser.add_argument("--corpus", nargs="+", action="extend", required=True, metavar="NAME=FILE")


def parse_named(items: list[str], flag: str) -> dict[str, str]:
    """`--tokenizer NAME=DIR ...` (or `--corpus`) -> {name: path}, in the order given."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ChlaError(f"--{flag} {item!r}: expected NAME=PATH")
        if name in named:
            raise ChlaError(f"--{flag} {name}: given twice; names must be unique")
        named[name] = path
    return named


def run(args: argparse.Namespace) -> int:
    from chla_tools import vocab

    if args.vocab_command == "train":
        vocab.train_spm(TRAIN_FLAGS.params(args), args.out)
    elif args.vocab_command == "train-bpe":
        vocab.train_bpe(TRAIN_BPE_FLAGS.params(args), args.out)
    elif args.vocab_command == "merge":
        vocab.merge_tokenizers(MERGE_FLAGS.params(args), args.out)
    else:
        params = VocabReportParams(
            tokenizers=parse_named(args.tokenizer, "tokenizer"), corpora=parse_named(args.corpus, "corpus")
        )
        report = vocab.vocab_report(params, args.out)
        print(vocab.render_markdown(report, next(iter(report["tokenizers"]))), end="")
    return 0

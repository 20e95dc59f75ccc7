"""Byte-level BPE training: corpus files -> a BPE tokenizer.json that splits text as the base does.

The trainer gets the base's own normalizer and pre-tokenizer, and all 256 byte symbols as its
initial alphabet, so every merge it learns joins two strings that the base's pre-tokenizer can
hand to its model (the merge, chla_tools.vocab.bpe_merge, appends them after the base's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.contract.atomic import new_directory, write_json
from chla_launcher.contract.errors import ChlaError

from .byte_level import build_component, load_byte_level_bpe
from .corpus import check_corpora, iter_corpus_lines
from .log import Log, print_line

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.train_bpe import TrainBpeParams


def train_bpe(params: TrainBpeParams, out_dir: str | os.PathLike[str], log: Log = print_line) -> dict[str, Any]:
    """Train a byte-level BPE with `params.merges` merges on `params.inputs`, using the
    pre-tokenizer of `params.base`; write out_dir/tokenizer.json and out_dir/train.json."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    base = load_byte_level_bpe(params.base, role="base tokenizer")
    paths = [Path(p) for p in params.inputs]
    started = time.monotonic()
    stats = check_corpora(paths)
    log(
        f"training a {params.merges}-merge byte-level BPE on {len(paths)} file(s): "
        f"{stats.lines:,} lines, {stats.chars:,} characters, with the base's pre-tokenizer"
    )
    tokenizer = Tokenizer(BPE())
    if base.get("normalizer"):
        tokenizer.normalizer = build_component("normalizer", base["normalizer"])
    tokenizer.pre_tokenizer = build_component("pre_tokenizer", base["pre_tokenizer"])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=len(alphabet) + params.merges,
        min_frequency=params.min_frequency,
        initial_alphabet=alphabet,
        special_tokens=[],
        show_progress=False,
    )

    def lines():
        for path in paths:
            yield from iter_corpus_lines(path)

    tokenizer.train_from_iterator(lines(), trainer=trainer, length=stats.lines)
    learnt = len(json.loads(tokenizer.to_str())["model"]["merges"])
    if learnt == 0:
        raise ChlaError(
            f"{paths[0] if len(paths) == 1 else f'{len(paths)} input files'}: no pair of symbols occurs "
            f"{params.min_frequency} times; add text or lower --min-frequency"
        )
    seconds = time.monotonic() - started
    with new_directory(out_dir) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        summary = {
            "base": str(params.base),
            "merges_requested": params.merges,
            "merges": learnt,
            "vocab_size": tokenizer.get_vocab_size(),
            "min_frequency": params.min_frequency,
            "lines": stats.lines,
            "chars": stats.chars,
            "seconds": round(seconds, 2),
        }
        write_json(tmp / "train.json", summary)
    short = f" (the corpus supports only {learnt})" if learnt < params.merges else ""
    log(f"wrote {Path(out_dir) / 'tokenizer.json'}: {learnt:,} merges{short} in {seconds:.1f} s")
    return summary

"""SentencePiece training: corpus files -> spm.model, with the original project's settings."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chla_launcher.contract.atomic import new_directory
from chla_launcher.contract.errors import ChlaError

from .corpus import check_corpora
from .log import Log, print_line

if TYPE_CHECKING:
    from chla_launcher.contract.kinds.train_spm import TrainSpmParams


def train_spm(params: TrainSpmParams, out_dir: str | os.PathLike[str], log: Log = print_line) -> dict[str, Any]:
    """Train a SentencePiece model on `params.inputs`; write out_dir/spm.model and out_dir/spm.vocab.

    The params' defaults follow the Chinese-LLaMA-Alpaca 20K Chinese model: BPE, character
    coverage 0.9995. Always: digits split (as in LLaMA, so merging adds no multi-digit pieces), no
    byte fallback (the base already has byte pieces) and identity normalisation (the base does not
    NFKC-normalise, so pieces must match raw text: with NFKC "，" would be learnt as ",").
    SentencePiece samples `input_sentence_size` lines (shuffled) from arbitrarily large inputs, so
    memory stays bounded.
    """
    import sentencepiece as spm

    vocab_size, model_type = params.vocab_size, params.model_type
    paths = [Path(p).resolve() for p in params.inputs]
    for path in paths:
        if "," in str(path):
            raise ChlaError(f"{path}: SentencePiece cannot read paths containing ','; rename it")
    started = time.monotonic()
    stats = check_corpora(paths)
    threads = params.threads or os.cpu_count() or 1
    log(
        f"training a {vocab_size}-piece {model_type} SentencePiece model on {len(paths)} file(s): "
        f"{stats.lines:,} lines, {stats.chars:,} characters, {threads} threads"
    )

    # Sentence sampling and shuffling use SentencePiece's global generator.
    spm.set_random_generator_seed(params.seed)
    with new_directory(out_dir) as tmp:
        try:
            spm.SentencePieceTrainer.train(
                input=[str(p) for p in paths],
                model_prefix=str(tmp / "spm"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=params.character_coverage,
                num_threads=threads,
                input_sentence_size=params.input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=params.max_sentence_length,
                split_digits=True,
                byte_fallback=False,
                normalization_rule_name="identity",
                minloglevel=2,
            )
        except RuntimeError as error:
            raise ChlaError(_explain_trainer_error(str(error), vocab_size, paths)) from None
    seconds = time.monotonic() - started
    model = Path(out_dir) / "spm.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    log(f"wrote {model}: {sp.get_piece_size():,} pieces in {seconds:.1f} s")
    return {
        "vocab_size": sp.get_piece_size(),
        "model_type": model_type,
        "lines": stats.lines,
        "chars": stats.chars,
        "seconds": round(seconds, 2),
    }


def _explain_trainer_error(message: str, vocab_size: int, paths: list[Path]) -> str:
    first = message.strip().splitlines()[-1] if message.strip() else "unknown error"
    where = paths[0] if len(paths) == 1 else f"{len(paths)} input files"
    if "smaller than required_chars" in message:
        return (
            f"{where}: a {vocab_size}-piece vocabulary cannot hold the characters the corpus "
            f"needs (SentencePiece: {first.split('] ')[-1].split(' Increase')[0]}); raise "
            "--vocab-size or lower --character-coverage"
        )
    if "Vocabulary size" in message or "vocab_size" in message:
        return (
            f"{where}: the corpus cannot support a {vocab_size}-piece vocabulary "
            f"(SentencePiece: {first.split('] ')[-1]}); lower --vocab-size or add text"
        )
    return f"{where}: SentencePiece training failed: {first}"

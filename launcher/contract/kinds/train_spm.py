"""`train_spm`: train a SentencePiece model on corpus text (out/spm.model, out/spm.vocab).

Defaults are the Chinese-LLaMA-Alpaca 20K Chinese model's: BPE, character coverage 0.9995,
digits split, identity normalisation. Large inputs are sampled (`input_sentence_size` lines,
shuffled), so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import InputPath, StageKind, StageParams


class TrainSpmParams(StageParams):
    """train a SentencePiece model on corpus text (out/spm.model)"""

    inputs: Annotated[list[str], InputPath()] = Field(
        min_length=1, description="UTF-8 text files, one sentence or paragraph a line"
    )
    vocab_size: int = Field(20000, ge=100, description="pieces in the trained model")
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece algorithm")
    character_coverage: float = Field(0.9995, gt=0, le=1, description="share of characters covered by single pieces")
    threads: int | None = Field(None, ge=1, description="trainer threads; default: all cores")
    input_sentence_size: int = Field(2_000_000, ge=1, description="lines sampled from the inputs for training")
    max_sentence_length: int = Field(16384, ge=16, description="longer lines (in bytes) are skipped")
    seed: int = Field(0, description="seed of the line sampling")


KIND = StageKind("train_spm", TrainSpmParams, "chla_train.stages.train_spm:run", needs_training_stack=False)

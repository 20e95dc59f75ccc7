"""`merge_tokenizer`: append a SentencePiece model's new pieces to a LLaMA-style base tokenizer.

Writes out/merged.model, out/tokenizer/ (HF tokenizer directory, loadable with
AutoTokenizer.from_pretrained) and out/merge.json (the arithmetic: base + new = merged).
Base ids are unchanged; the HF fast tokenizer gives the same ids as SentencePiece.
`pad_token: true` appends exactly one [PAD] (the SFT variant). `scores: original` scores the
new pieces as the original merge_tokenizers.py did (all 0): the same .model, byte for byte, for
continuing a model trained with the original's tokenizer; its fast tokenizer then disagrees
with SentencePiece on some lines (vocab_report's fast=slow column).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import InputPath, StageKind, StageParams


class MergeTokenizerParams(StageParams):
    """merge a SentencePiece model into a base tokenizer (out/tokenizer, out/merged.model)"""

    base: Annotated[str, InputPath()] = Field(
        description="base tokenizer: HF directory with tokenizer.model, or the .model file"
    )
    add: Annotated[str, InputPath()] = Field(
        description="SentencePiece model whose pieces are added (e.g. a train_spm stage's spm.model)"
    )
    pad_token: bool = Field(False, description="append one [PAD] control piece (SFT variant)")
    scores: Literal["below_base", "original"] = Field(
        "below_base",
        description="new pieces' scores: below every base piece (the HF tokenizer "
        "then equals SentencePiece), or 0 as the original merge_tokenizers.py (same .model, byte for byte)",
    )


KIND = StageKind(
    "merge_tokenizer", MergeTokenizerParams, "chla_train.stages.merge_tokenizer:run", needs_training_stack=False
)

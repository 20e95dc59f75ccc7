"""`merge_tokenizer`: append a SentencePiece model's new pieces to a LLaMA-style base tokenizer.

Writes out/merged.model, out/tokenizer/ (HF tokenizer directory, loadable with
AutoTokenizer.from_pretrained) and out/merge.json (the arithmetic: base + new = merged).
Base ids are unchanged; the HF fast tokenizer gives the same ids as SentencePiece.
`pad_token: true` appends exactly one [PAD] (the SFT variant).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from . import InputPath, StageKind, StageParams


class MergeTokenizerParams(StageParams):
    base: Annotated[str, InputPath()] = Field(
        description="base tokenizer: HF directory with tokenizer.model, or the .model file")
    add: Annotated[str, InputPath()] = Field(
        description="SentencePiece model whose pieces are added (e.g. a train_spm stage's spm.model)")
    pad_token: bool = Field(False, description="append one [PAD] control piece (SFT variant)")


KIND = StageKind(
    name="merge_tokenizer",
    params=MergeTokenizerParams,
    entry="chla_tools.vocab:run_merge_tokenizer",
    description="merge a SentencePiece model into a base tokenizer (out/tokenizer, out/merged.model)",
    needs_training_stack=False,
)

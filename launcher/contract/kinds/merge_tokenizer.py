"""`merge_tokenizer`: append a SentencePiece model's new pieces to a LLaMA-style base tokenizer,
or a train_bpe stage's merges to a byte-level BPE base (Llama 3, SmolLM, Qwen).

Writes out/merged.model, out/tokenizer/ (HF tokenizer directory, loadable with
AutoTokenizer.from_pretrained) and out/merge.json (the arithmetic: base + new = merged).
Base ids are unchanged; the HF fast tokenizer gives the same ids as SentencePiece.
`pad_token: true` appends exactly one [PAD] (the SFT variant). `scores: original` scores the
new pieces as the original merge_tokenizers.py did (all 0): the same .model, byte for byte, for
continuing a model trained with the original's tokenizer; its fast tokenizer then disagrees
with SentencePiece on some lines (vocab_report's "HF = reference" column).

A byte-level BPE base (a tokenizer.json with a ByteLevel pre-tokenizer, no tokenizer.model) is
detected from `base`; `add` is then a train_bpe stage's out directory, and out/ holds tokenizer/
and merge.json (no merged.model). Base ids and added tokens are kept, the new merges rank after
the base's, ASCII text keeps the base's ids, and tokens the merged tokenizer never produces are
removed (chla_tools.vocab.bpe_merge says how).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import InputPath, StageKind, StageParams


class MergeTokenizerParams(StageParams):
    """merge a trained Chinese tokenizer into a base tokenizer (out/tokenizer; SentencePiece: out/merged.model)"""

    base: Annotated[str, InputPath()] = Field(
        description="base tokenizer: HF directory with tokenizer.model, or the .model file; or a "
        "byte-level BPE HF directory (tokenizer.json)"
    )
    add: Annotated[str, InputPath()] = Field(
        description="what is added: a SentencePiece model (a train_spm stage's spm.model), or for a "
        "byte-level BPE base a train_bpe stage's out directory"
    )
    pad_token: bool = Field(False, description="append one [PAD] special token (SFT variant)")
    scores: Literal["below_base", "original"] = Field(
        "below_base",
        description="new pieces' scores: below every base piece (the HF tokenizer "
        "then equals SentencePiece), or 0 as the original merge_tokenizers.py (same .model, byte for byte)",
    )


KIND = StageKind(
    "merge_tokenizer", MergeTokenizerParams, "chla_train.stages.merge_tokenizer:run", needs_training_stack=False
)

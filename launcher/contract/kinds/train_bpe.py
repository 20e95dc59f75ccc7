"""`train_bpe`: train a byte-level BPE on corpus text with a base tokenizer's own pre-tokenizer
(out/tokenizer.json, out/train.json).

For byte-level BPE bases (Llama 3, SmolLM, Qwen: a tokenizer.json with a ByteLevel
pre-tokenizer); a merge_tokenizer stage then appends its merges after the base's. LLaMA-1/2-style
SentencePiece bases take train_spm instead.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from . import InputPath, StageKind, StageParams


class TrainBpeParams(StageParams):
    """train a byte-level BPE with a base tokenizer's pre-tokenizer (out/tokenizer.json)"""

    inputs: Annotated[list[str], InputPath()] = Field(
        min_length=1, description="UTF-8 text files, one sentence or paragraph a line"
    )
    base: Annotated[str, InputPath()] = Field(
        description="base tokenizer: HF directory with a byte-level BPE tokenizer.json, or the file"
    )
    merges: int = Field(20000, ge=1, description="merges to learn (the trained model has 256 bytes + merges)")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")


KIND = StageKind("train_bpe", TrainBpeParams, "chla_train.stages.train_bpe:run", needs_training_stack=False)

"""`merge`: merge LoRA adapters (in order) into a base model, streaming tensor by tensor.

The output is an HF model directory (safetensors shards of at most `shard_size` with an index,
config with the new vocabulary size, the tokenizer of the last adapter that has one). Peak
memory is about one tensor plus the adapters, so a 7B merge fits on a login-sized node.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from . import InputPath, StageKind, StageParams


class MergeParams(StageParams):
    """merge LoRA adapters into a base model in bounded memory (safetensors shards)"""

    base: Annotated[str, InputPath()] = Field(description="HF model directory (safetensors)")
    adapters: Annotated[list[str], InputPath()] = Field(
        min_length=1, description="peft LoRA adapter directories, applied in this order"
    )
    shard_size: str = Field("5GB", description="largest output shard, e.g. 5GB, 500MB, 2GiB")
    dtype: Literal["bf16", "fp16", "fp32"] | None = Field(
        None, description="output dtype of floating tensors; default: keep the base's"
    )

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE):
            raise ValueError(f"{value!r} is not a size; write it like 5GB, 500MB or 2GiB")
        return value


KIND = StageKind("merge", MergeParams, "chla_train.stages.merge:run")

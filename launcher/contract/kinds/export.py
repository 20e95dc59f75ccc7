"""`export`: an HF model directory in the format the next tool takes; today GGUF for llama.cpp.

A 7B conversion reads and writes ~27 GB, which is cluster work, hence a stage. It runs llama.cpp's
own convert_hf_to_gguf.py (from the pinned llama-cpp-python sdist, see chla_tools.gguf_export)
after checking the model's vocabulary rows against its tokenizer, and writes out/<file_name>
and out/export.json. Needs the `gguf` extra (`pip install chla[gguf]`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from . import InputPath, StageKind, StageParams


class ExportParams(StageParams):
    """convert an HF model to GGUF with llama.cpp's own converter (vocabulary checked first)"""

    model: Annotated[str, InputPath()] = Field(
        description="HF model directory (a merge stage's out, with the tokenizer beside the weights)"
    )
    format: Literal["gguf"] = Field("gguf", description="gguf: llama.cpp's file format")
    outtype: Literal["f32", "f16", "q8_0"] = Field(
        "f16", description="tensor type in the file (q8_0: 8-bit, about half of f16)"
    )
    file_name: str = Field("model.gguf", description="name of the file in the stage's out directory")
    pre_tokenizer: str | None = Field(
        None,
        description="llama.cpp's name of a byte-level BPE tokenizer's pre-tokenizer (gpt-2, smollm, llama-bpe, ...), "
        "used when its converter does not recognise the vocabulary (an extended one); default: read from "
        "tokenizer.json",
    )

    @field_validator("file_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError(f"{value!r} must be a plain file name (letters, digits, '_', '.', '-')")
        return value

    @field_validator("pre_tokenizer")
    @classmethod
    def _plain_pre_tokenizer(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", value):
            raise ValueError(f"{value!r} is not a llama.cpp pre-tokenizer name (lower case, like 'gpt-2', 'smollm')")
        return value


KIND = StageKind("export", ExportParams, "chla_train.stages.export:run")

"""`import_gguf`: a GGUF file (llama.cpp's format) as a plain HF model folder in out/.

Reads the file with transformers' own GGUF loader (the `gguf` package dequantizes it) and writes
model.safetensors, config.json, generation_config.json, a tokenizer transformers 4 and 5 both load
(with the file's chat template) and chla_import.json with the source's sha256
(chla_tools.gguf_import). Tied embeddings stay one tensor. Needs the `gguf` extra.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from . import InputPath, StageKind, StageParams


class ImportGgufParams(StageParams):
    """turn a GGUF file into an HF model folder (safetensors, config, a tokenizer transformers 4 and 5 load)"""

    gguf: Annotated[str, InputPath()] = Field(
        description="the .gguf file (e.g. a fetch_assets stage's base_model/ with base_model: true)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="tensor type in the folder (float32 keeps dequantized values exactly; bfloat16 halves the size)",
    )


KIND = StageKind("import_gguf", ImportGgufParams, "chla_train.stages.import_gguf:run")

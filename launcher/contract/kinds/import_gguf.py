"""`import_gguf`: a GGUF file (llama.cpp's format) as a plain HF model folder in out/.

Reads the file with transformers' own GGUF loader (the `gguf` package dequantizes it) and writes
model.safetensors, config.json, generation_config.json, a tokenizer transformers 4 and 5 both load
(with the file's chat template) and chla_import.json with the source's sha256
(chla_tools.gguf_import). Tied embeddings stay one tensor. Needs the `gguf` extra.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import Field

from . import InputPath, ModelOutput, StageKind, StageParams, TokenizerOutput


class ImportGgufParams(StageParams):
    """turn a GGUF file into an HF model folder (safetensors, config, a tokenizer transformers 4 and 5 load)"""

    gguf: Annotated[str, InputPath()] = Field(
        description="the .gguf file (e.g. a fetch_assets stage's base_model/ with base_model: true)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="tensor type in the folder (float32 keeps dequantized values exactly; bfloat16 halves the size)",
    )


def planned_config(params: ImportGgufParams) -> tuple[dict[str, Any] | None, str]:
    """The config.json-like shape of the model this stage will write, from the GGUF file's header
    (what `chla plan` sizes before the stage has run; no tensor is read)."""
    try:
        with open(params.gguf, "rb") as file:
            metadata, tensors = read_gguf_header(file)
    except FileNotFoundError:
        return None, (
            f"made from {params.gguf}, not there yet (sized from its GGUF header once an earlier stage "
            "has written it; or name its architecture: chla plan --arch NAME)"
        )
    except (OSError, ValueError, struct.error) as error:
        return None, f"{params.gguf}: not a GGUF file chla can read ({error})"
    arch = metadata.get("general.architecture")
    needed = {
        "num_hidden_layers": f"{arch}.block_count",
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_attention_heads": f"{arch}.attention.head_count",
    }
    missing = [key for key in needed.values() if key not in metadata]
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get(f"{arch}.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    if missing or vocab is None:
        return None, f"{params.gguf}: its header lacks {', '.join(missing) or 'a vocabulary'} (architecture {arch})"
    config = {key: int(metadata[name]) for key, name in needed.items()}
    heads_kv = metadata.get(f"{arch}.attention.head_count_kv")
    config["num_key_value_heads"] = int(heads_kv) if heads_kv else config["num_attention_heads"]
    head_dim = metadata.get(f"{arch}.attention.key_length")
    if head_dim:
        config["head_dim"] = int(head_dim)
    config["vocab_size"] = int(vocab)
    # A GGUF file without an output matrix reuses the token embeddings (transformers ties them).
    config["tie_word_embeddings"] = "output.weight" not in tensors
    return config, f"the header of {params.gguf}"


# GGUF metadata value types (llama.cpp's gguf.h): struct formats of the scalars; 8 string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(file: BinaryIO) -> tuple[dict[str, Any], set[str]]:
    """(metadata key -> value, tensor names) of a GGUF file (versions 2 and 3), read from its
    header alone: no gguf package needed, no tensor data read."""

    def unpack(fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = file.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def string() -> str:
        return file.read(unpack("<Q")).decode("utf-8", errors="replace")

    def value(kind: int) -> Any:
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = unpack("<I"), unpack("<Q")
            return [value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata type {kind}")
        return unpack(_SCALARS[kind])

    if file.read(4) != b"GGUF":
        raise ValueError("no GGUF magic")
    version = unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    tensor_count, metadata_count = unpack("<Q"), unpack("<Q")
    metadata = {}
    for _ in range(metadata_count):
        key = string()
        metadata[key] = value(unpack("<I"))
    tensors = set()
    for _ in range(tensor_count):
        tensors.add(string())
        dims = unpack("<I")
        file.read(8 * dims + 4 + 8)  # the dimensions, the type, the data offset
    return metadata, tensors


KIND = StageKind(
    "import_gguf",
    ImportGgufParams,
    "chla_train.stages.import_gguf:run",
    model_output=ModelOutput(config=planned_config),
    tokenizer_output=TokenizerOutput(of_model=True),  # the file's vocabulary, one entry per token
)

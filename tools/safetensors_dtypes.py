"""The safetensors dtype codes chla reads (chla_tools.merge, and chla_train.model's
SafetensorsRanges): the torch dtype of each, by name (torch is imported when a tensor is read),
and bytes per element. A module of its own, outside the merge package: a training stage's code
fingerprint follows its imports, and the merge's modules are not the training's code."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TORCH_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code ("F16" -> torch.float16); KeyError for a code
    not in TORCH_DTYPE_NAMES."""
    import torch

    dtype: torch.dtype = getattr(torch, TORCH_DTYPE_NAMES[code])
    return dtype

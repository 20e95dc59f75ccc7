"""Reading safetensors files and HF model directories: headers parsed, single tensors read with
positioned reads (never through a long-lived memory map, whose pages would stay in RSS)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chla_launcher.contract.errors import ChlaError
from chla_tools.safetensors_dtypes import ITEMSIZE, torch_dtype

# torch is imported only once the merge needs it: `import torch` takes about a second, which the
# kernel spends copying the unchanged tensors meanwhile (see chla_tools.merge.shards).
if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype -> safetensors dtype code

FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype code: F16, BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """The header of one .safetensors file, and positioned reads of single tensors from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                header_len = int.from_bytes(prefix, "little")
                if header_len > size - 8:
                    raise ValueError(f"header claims {header_len} bytes, file has {size}")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ChlaError(f"{path}: not a readable safetensors file ({err}); re-copy or re-save it") from None
        data_start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorEntry] = {}
        data_end = 0
        for name, info in header.items():
            dtype = info.get("dtype")
            if dtype not in ITEMSIZE:
                raise ChlaError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            self.tensors[name] = TensorEntry(dtype, tuple(info["shape"]), data_start + begin, end - begin)
            data_end = max(data_end, end)
        if data_start + data_end > size:
            raise ChlaError(
                f"{path}: truncated safetensors file: its header needs {data_start + data_end} bytes, "
                f"the file has {size}; re-copy or re-save it"
            )

    def read(self, name: str) -> torch.Tensor:
        import torch

        entry = self.tensors[name]
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8).numpy()
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(entry.start)
            view, done = buffer.data, 0
            while done < entry.nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise ChlaError(f"{self.path}: truncated while reading tensor {name}; re-copy it")
                done += got
        return torch.from_numpy(buffer).view(torch_dtype(entry.dtype)).reshape(entry.shape)


class Checkpoint:
    """An HF model directory saved as safetensors (one file or shards with an index)."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = model_dir
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ChlaError(f"base model {model_dir}: no config.json; pass a save_pretrained directory")
        self.config = read_json_file(config_path)
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = read_json_file(index_path).get("weight_map") or {}
            file_names = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            file_names = ["model.safetensors"]
        else:
            raise ChlaError(
                f"base model {model_dir}: no model.safetensors or model.safetensors.index.json; "
                "re-save it with save_pretrained (safetensors is the default)"
            )
        self.files: dict[str, SafetensorsFile] = {}  # tensor name -> its file
        for file_name in file_names:
            shard = SafetensorsFile(model_dir / file_name)
            for name in shard.tensors:
                self.files[name] = shard

    def entry(self, name: str) -> TensorEntry:
        return self.files[name].tensors[name]

    def read(self, name: str) -> torch.Tensor:
        return self.files[name].read(name)


def read_json_file(path: Path) -> dict:
    """A JSON file the merge needs (config, index, adapter or tokenizer config): one that is
    missing or does not parse is one clear error, not a traceback."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ChlaError(f"{path}: unreadable JSON ({err})") from None

"""Merge LoRA adapters into a base model in bounded memory (`chla merge`, stage kind `merge`).

The original project loaded the whole model into memory and called peft's merge_and_unload.
Here the base is streamed: every output shard's header is laid out in advance, tensors that no
adapter changes are copied byte for byte from file to file inside the kernel, and tensors that a
LoRA changes are read, merged and written in row chunks at their final offsets, with peft's own
arithmetic (delta (B @ A) * scale in fp32, added to the weight and rounded once to its dtype), so
the result is bit for bit what merge_and_unload gives. Peak memory is a few 16 MB chunks plus
the adapters, whatever the model's size (one whole tensor more when --dtype converts).

Why not `safe_open` for the data: pages of a memory-mapped file stay resident (and count in
RSS) for as long as the file is mapped, so reading a 10 GB shard through one mapping makes the
process hold 10 GB. Chunks are read with plain positioned reads into a few reused buffers
(reading through a short-lived mapping of each chunk instead was measured: no faster).

Names. peft saves a LoRA module as `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`
(`.lora_embedding_A` / `.lora_embedding_B` for an embedding), a modules_to_save module as
`base_model.model.<module>.weight` (peft >= 0.13; older versions wrote
`<module>.modules_to_save.<adapter>.weight`), and with `save_embedding_layers` the resized base
embedding of a LoRA-adapted embedding as `<module>.base_layer.weight` (of one with trainable token
rows as `<module>.token_adapter.base_layer.weight`). All map to the base tensor `<module>.weight`.

Trainable token rows (LoraConfig.trainable_token_indices, chla's `vocab_rows: new`): the adapter
holds `<module>.token_adapter.trainable_tokens_delta`, one row per index listed in
adapter_config.json; merging writes those rows over the matrix's rows at those indices (peft's
index_copy, the values cast to the matrix's dtype). Indices past the base's last row grow the
matrix; every row it grows by must be among them.

Vocabulary growth (32000 -> 49953 -> 49954 in the original): an adapter's saved embed_tokens and
lm_head define the new number of rows; fewer rows than the model already has is refused.
With tied embeddings (`tie_word_embeddings`) the base has no lm_head tensor; if an adapter
changes embed_tokens or lm_head, the merged model gets its own lm_head (what the adapter model
computed with) and the config is untied.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chla_launcher.atomic import replace_dir
from chla_launcher.errors import ChlaError
from chla_launcher.progress import progress_writer
from chla_tools.hf_tokenizer import make_portable

if TYPE_CHECKING:
    import torch

    from chla_launcher.kinds.merge import MergeParams
    from chla_train.context import StageContext

# torch is imported only once the merge needs it: `import torch` takes about a second, which the
# kernel spends copying the unchanged tensors meanwhile (see _write_shards).
DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}  # --dtype -> safetensors dtype code

# safetensors dtype codes <-> torch dtypes.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
_CONFIG_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code ("F16" -> torch.float16)."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }[code]


TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
_PEFT_PREFIX = "base_model.model."
_TOKEN_ROWS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.[A-Za-z0-9_]+)?$")
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$"
)

Log = Callable[[str], None]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (HF's convention: GB = 10**9, GiB = 2**30); plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ChlaError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    size = int(number * scale)
    if size <= 0:
        raise ChlaError(f"shard size {text!r} must be positive")
    return size


# --- reading safetensors without keeping a mapping ------------------------------------------


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
            if dtype not in _ITEMSIZE:
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
        self.config = _read_json(config_path)
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map") or {}
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


# --- adapters ---------------------------------------------------------------------------------


@dataclass
class LoraPair:
    a_key: str
    b_key: str
    scale: float
    fan_in_fan_out: bool
    embedding: bool


@dataclass
class TokenRows:
    key: str  # the adapter tensor holding the rows, in the order of `indices`
    indices: list[int]


@dataclass
class Adapter:
    dir: Path
    file: SafetensorsFile
    config: dict
    # base tensor name -> adapter tensor name that replaces it (modules_to_save, base_layer)
    replacements: dict[str, str] = field(default_factory=dict)
    loras: dict[str, LoraPair] = field(default_factory=dict)
    # base tensor name -> rows the adapter writes over it (trainable token indices)
    token_rows: dict[str, TokenRows] = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return _has_tokenizer(self.dir)


def _pattern_value(patterns: dict | None, module: str, default):
    # peft's get_pattern_key: a pattern matches a module name suffix (as a regex)
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def load_adapter(adapter_dir: Path) -> Adapter:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ChlaError(f"adapter {adapter_dir}: no adapter_config.json; pass a peft save_pretrained directory")
    config = _read_json(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ChlaError(f"adapter {adapter_dir}: peft_type {config.get('peft_type')} is not LoRA; only LoRA merges")
    for unsupported in ("use_dora", "lora_bias", "layer_replication", "target_parameters"):
        if config.get(unsupported):
            raise ChlaError(
                f"adapter {adapter_dir}: adapter_config.json sets {unsupported}, which chla merge "
                "does not support; merge it with peft merge_and_unload instead"
            )
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ChlaError(
            f"adapter {adapter_dir}: no adapter_model.safetensors; re-save it with "
            "save_pretrained(safe_serialization=True)"
        )
    adapter = Adapter(dir=adapter_dir, file=SafetensorsFile(weights), config=config)

    lora_parts: dict[str, dict[str, str]] = {}
    for key in adapter.file.tensors:
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match:
            lora_parts.setdefault(match["module"], {})[match["part"]] = key
            continue
        match = _TOKEN_ROWS_KEY.match(name)
        if match:
            adapter.token_rows[f"{match['module']}.weight"] = TokenRows(key, _token_indices(adapter, match["module"]))
            continue
        # modules_to_save copies and saved base layers replace the base tensor
        name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_]+)?\.", ".", name)
        name = name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        if ".original_module." in name:
            continue
        adapter.replacements[name] = key

    use_rslora = bool(config.get("use_rslora"))
    for module, parts in lora_parts.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise ChlaError(
                f"adapter {adapter_dir}: {module} has only one of its LoRA A/B tensors; the adapter file is incomplete"
            )
        rank = adapter.file.tensors[a_key].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        adapter.loras[f"{module}.weight"] = LoraPair(a_key, b_key, scale, bool(config.get("fan_in_fan_out")), embedding)
    return adapter


def _token_indices(adapter: Adapter, module: str) -> list[int]:
    """The trainable token indices adapter_config.json gives for `module` (peft: a list means the
    input embedding; a dict maps module names, matched as suffixes, to lists)."""
    configured = adapter.config.get("trainable_token_indices")
    if isinstance(configured, list) and module.endswith("embed_tokens"):
        return [int(i) for i in configured]
    indices = _pattern_value(configured if isinstance(configured, dict) else {}, module, None)
    if indices is None:
        raise ChlaError(
            f"adapter {adapter.dir}: it holds trainable token rows for {module} but "
            "adapter_config.json's trainable_token_indices names no such module"
        )
    return [int(i) for i in indices]


# --- planning: every shape is checked before a byte is written ---------------------------------


@dataclass
class PlannedTensor:
    name: str
    source: str  # base tensor it starts from
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def plan_merge(base: Checkpoint, adapters: list[Adapter], dtype: str | None) -> tuple[list[PlannedTensor], bool]:
    """Output tensors in base order with their final shapes; and whether embeddings stay tied."""
    tied = bool(base.config.get("tie_word_embeddings", False))
    shapes = {name: base.entry(name).shape for name in base.files}
    sources = {name: name for name in base.files}
    if tied and LM_HEAD_KEY not in shapes and EMBED_KEY in shapes:
        # the output head is the input embedding; it becomes a tensor of its own only if an
        # adapter makes the two differ
        shapes[LM_HEAD_KEY], sources[LM_HEAD_KEY] = shapes[EMBED_KEY], EMBED_KEY
    vocab_keys = {EMBED_KEY, LM_HEAD_KEY}
    touched: set[str] = set()

    for adapter in adapters:
        hint = (
            f"this adapter was trained on a different base "
            f"(its base_model_name_or_path: {adapter.config.get('base_model_name_or_path')})"
        )
        for name, key in adapter.replacements.items():
            if name not in shapes:
                raise ChlaError(
                    f"adapter {adapter.dir}: tensor {key} has no counterpart {name} in base {base.dir}; {hint}"
                )
            new, old = adapter.file.tensors[key].shape, shapes[name]
            if new != old:
                growable = name in vocab_keys and len(new) == 2 and new[1:] == old[1:]
                if not growable:
                    raise ChlaError(
                        f"adapter {adapter.dir}: tensor {key} has shape {_fmt(new)} but the model's "
                        f"{name} is {_fmt(old)}; {hint}"
                    )
                if new[0] < old[0]:
                    raise ChlaError(
                        f"adapter {adapter.dir}: {key} has {new[0]} rows but the model already has "
                        f"{old[0]} (vocabulary would shrink); apply adapters in training order "
                        "(pretraining before SFT)"
                    )
            shapes[name] = new
            touched.add(name)
        for name, lora in adapter.loras.items():
            if name not in shapes:
                raise ChlaError(
                    f"adapter {adapter.dir}: LoRA tensor {lora.a_key} has no counterpart {name} "
                    f"in base {base.dir}; {hint}"
                )
            a_shape = adapter.file.tensors[lora.a_key].shape
            b_shape = adapter.file.tensors[lora.b_key].shape
            delta = (a_shape[1], b_shape[0]) if (lora.embedding or lora.fan_in_fan_out) else (b_shape[0], a_shape[1])
            if len(shapes[name]) != 2 or tuple(shapes[name]) != delta or a_shape[0] != b_shape[1]:
                raise ChlaError(
                    f"adapter {adapter.dir}: LoRA tensors {lora.a_key} {_fmt(a_shape)} and "
                    f"{lora.b_key} {_fmt(b_shape)} do not fit the model's {name} "
                    f"{_fmt(shapes[name])}; {hint}"
                )
            touched.add(name)
        for name, rows in adapter.token_rows.items():
            if name not in shapes:
                raise ChlaError(
                    f"adapter {adapter.dir}: token rows {rows.key} have no counterpart {name} "
                    f"in base {base.dir}; {hint}"
                )
            delta_shape, old = adapter.file.tensors[rows.key].shape, shapes[name]
            if len(old) != 2 or tuple(delta_shape) != (len(rows.indices), old[1]):
                raise ChlaError(
                    f"adapter {adapter.dir}: {rows.key} has shape {_fmt(delta_shape)} for "
                    f"{len(rows.indices)} token indices of {name} {_fmt(old)}; {hint}"
                )
            if any(name in other.loras for other in adapters):
                raise ChlaError(
                    f"adapter {adapter.dir}: {name} has both LoRA matrices and trainable token "
                    "rows among the adapters, which chla merge does not combine; merge with "
                    "peft merge_and_unload instead"
                )
            grown = max(rows.indices) + 1
            missing = sorted(set(range(old[0], grown)) - set(rows.indices))
            if missing:
                raise ChlaError(
                    f"adapter {adapter.dir}: its token rows grow {name} from {old[0]} to {grown} "
                    f"rows but do not hold rows {missing[0]}..{missing[-1]}; the adapter was "
                    "trained on a larger base"
                )
            shapes[name] = (max(old[0], grown), old[1])
            touched.add(name)

    keep_tied = tied and not (touched & vocab_keys) and sources.get(LM_HEAD_KEY) == EMBED_KEY
    if keep_tied:
        shapes.pop(LM_HEAD_KEY, None)
    if EMBED_KEY in shapes and LM_HEAD_KEY in shapes and shapes[EMBED_KEY][0] != shapes[LM_HEAD_KEY][0]:
        raise ChlaError(
            f"after the adapters, {EMBED_KEY} has {shapes[EMBED_KEY][0]} rows but {LM_HEAD_KEY} has "
            f"{shapes[LM_HEAD_KEY][0]}; an adapter that grows the vocabulary must save both "
            "(modules_to_save: [embed_tokens, lm_head])"
        )
    planned = []
    for name, shape in shapes.items():
        source_dtype = base.entry(sources[name]).dtype
        out_dtype = dtype if (dtype is not None and source_dtype in _FLOAT_CODES) else source_dtype
        planned.append(PlannedTensor(name, sources[name], tuple(shape), out_dtype))
    return planned, keep_tied


# --- merging: the arithmetic of stock peft, row block by row block --------------------------

# Rows of a weight are merged in blocks of about this many elements. The LoRA delta of a row
# depends only on that row, so a block's fp32 scratch (the widened weight and its delta) stays
# in the CPU cache, and the memory a merge needs does not grow with the size of a matrix.
_BLOCK_ELEMENTS = 128 * 1024


@dataclass
class LoraDelta:
    """delta = (left @ right) * scale in fp32, with `left` having the weight's rows (B for a
    Linear, A^T for an embedding or a fan_in_fan_out layer, as peft transposes B @ A there)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float


def load_lora(adapter: Adapter, lora: LoraPair) -> LoraDelta:
    # peft upcasts fp16/bf16 adapter weights to fp32 when it loads them (autocast_adapter_dtype)
    lora_a = adapter.file.read(lora.a_key).float()
    lora_b = adapter.file.read(lora.b_key).float()
    if lora.embedding or lora.fan_in_fan_out:
        return LoraDelta(lora_a.t().contiguous(), lora_b.t().contiguous(), lora.scale)
    return LoraDelta(lora_b, lora_a, lora.scale)


class Scratch:
    """Two fp32 blocks reused for every row block: the widened weight and the delta."""

    def __init__(self) -> None:
        import torch

        self.wide = torch.empty(_BLOCK_ELEMENTS, dtype=torch.float32)
        self.delta = torch.empty(_BLOCK_ELEMENTS, dtype=torch.float32)

    def grow(self, elements: int) -> None:
        if self.wide.numel() < elements:  # a single row longer than a block
            import torch

            self.wide = torch.empty(elements, dtype=torch.float32)
            self.delta = torch.empty(elements, dtype=torch.float32)


def apply_loras(rows: torch.Tensor, first_row: int, deltas: list[LoraDelta], scratch: Scratch) -> None:
    """rows += delta[first_row:first_row + len(rows)] for each delta in order, in place.

    Bit for bit what peft's merge does on CPU: `weight.data += (B @ A) * scale` with the delta in
    fp32 (peft holds adapter weights in fp32), so a half-precision weight is widened, the delta
    added in fp32, and the sum rounded once back to the weight's dtype, once per adapter."""
    import torch

    columns = rows.shape[1]
    step = max(1, _BLOCK_ELEMENTS // max(1, columns))
    scratch.grow(step * columns)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        shape = tuple(block.shape)
        delta = scratch.delta[: block.numel()].view(shape)
        wide = block if block.dtype == torch.float32 else scratch.wide[: block.numel()].view(shape)
        for lora in deltas:
            torch.mm(lora.left[first_row + start : first_row + start + shape[0]], lora.right, out=delta)
            delta.mul_(lora.scale)
            if wide is block:
                block.add_(delta)
            else:
                wide.copy_(block)
                wide.add_(delta)
                block.copy_(wide)


@dataclass
class TensorSource:
    """Where an output tensor's bytes start from (the base's tensor, or the last replacement of
    it), and the LoRA deltas, then the token rows, written over it after that, in order (the
    planner refuses a tensor with both)."""

    file: SafetensorsFile
    key: str
    loras: list[tuple[Adapter, LoraPair]]
    token_rows: list[tuple[Adapter, TokenRows]] = field(default_factory=list)


def tensor_source(item: PlannedTensor, base: Checkpoint, adapters: list[Adapter]) -> TensorSource:
    source = TensorSource(base.files[item.source], item.source, [])
    for adapter in adapters:
        key = adapter.replacements.get(item.name)
        if key is not None:
            source = TensorSource(adapter.file, key, [])
        lora = adapter.loras.get(item.name)
        if lora is not None:
            source.loras.append((adapter, lora))
        rows = adapter.token_rows.get(item.name)
        if rows is not None:
            source.token_rows.append((adapter, rows))
    return source


@dataclass
class RowPatch:
    """Rows written over a matrix: row indices[i] becomes values[i] (already in its dtype)."""

    indices: torch.Tensor
    values: torch.Tensor


def load_row_patch(adapter: Adapter, rows: TokenRows, dtype) -> RowPatch:
    import torch

    return RowPatch(torch.tensor(rows.indices, dtype=torch.long), adapter.file.read(rows.key).to(dtype))


def apply_row_patches(rows: torch.Tensor, first_row: int, patches: list[RowPatch]) -> None:
    """rows (rows first_row.. of the matrix) with every patched row among them overwritten."""
    for patch in patches:
        inside = (patch.indices >= first_row) & (patch.indices < first_row + rows.shape[0])
        if bool(inside.any()):
            rows[patch.indices[inside] - first_row] = patch.values[inside]


def merged_tensor(
    item: PlannedTensor, base: Checkpoint, adapters: list[Adapter], scratch: Scratch | None = None
) -> torch.Tensor:
    """One output tensor, whole in memory: the base's, then every adapter in order. Used where
    the dtype changes; same-dtype tensors are streamed in row chunks by `merge_adapters`."""
    import torch

    scratch = scratch or Scratch()
    out_dtype = torch_dtype(item.dtype)
    tensor = base.read(item.source)
    for adapter in adapters:
        key = adapter.replacements.get(item.name)
        if key is not None:
            tensor = adapter.file.read(key)
        lora = adapter.loras.get(item.name)
        if lora is not None:
            # work in the wider of the stored and the requested dtype
            if out_dtype.itemsize > tensor.dtype.itemsize:
                tensor = tensor.to(out_dtype)
            apply_loras(tensor, 0, [load_lora(adapter, lora)], scratch)
        rows = adapter.token_rows.get(item.name)
        if rows is not None:
            patch = load_row_patch(adapter, rows, tensor.dtype)
            grown = int(patch.indices.max()) + 1
            if grown > tensor.shape[0]:
                tensor = torch.cat([tensor, tensor.new_zeros(grown - tensor.shape[0], *tensor.shape[1:])])
            apply_row_patches(tensor, 0, [patch])
    return tensor.to(out_dtype).contiguous()


# --- writing shards whose headers are laid out before the data --------------------------------

# Bytes of one chunk read, merged and written as a unit, and how many chunk buffers exist:
# while one chunk is merged, the next is being read and earlier ones written, in threads
# (file reads and writes, and torch's arithmetic, release the GIL).
_CHUNK_BYTES = 16 * 2**20
_CHUNK_BUFFERS = 4
_READ_AHEAD = 2


def _pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise ChlaError(f"{what}: file ended early (truncated while merging?); re-copy it")
        done += got


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _load_sync_file_range():
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return function
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()


class Flusher:
    """Asks the kernel to start writing just-written bytes to disk now (Linux sync_file_range
    with SYNC_FILE_RANGE_WRITE), so the disk works while the merge goes on and the one fsync per
    file at the end (which alone makes the output durable) has little left to do. The call can
    block while the disk's queue is full, so a thread of its own makes it."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chla-merge-flush") if _SYNC_FILE_RANGE else None

    def start(self, fd: int, offset: int, nbytes: int) -> None:
        if self.pool is not None and nbytes:
            self.pool.submit(_SYNC_FILE_RANGE, fd, offset, nbytes, 2)  # 2: SYNC_FILE_RANGE_WRITE

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _copy_range(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int, what: str) -> None:
    """Byte-for-byte copy between files inside the kernel (no trip through this process)."""
    done = 0
    while done < nbytes:
        try:
            got = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError:  # e.g. across file systems on old kernels: copy through a buffer
            got = _copy_through_buffer(
                src_fd, dst_fd, min(nbytes - done, _CHUNK_BYTES), src_offset + done, dst_offset + done, what
            )
        if not got:
            raise ChlaError(f"{what}: file ended early (truncated while merging?); re-copy it")
        done += got


def _copy_through_buffer(src_fd: int, dst_fd: int, nbytes: int, src_offset: int, dst_offset: int, what: str) -> int:
    buffer = bytearray(nbytes)
    _pread_into(src_fd, memoryview(buffer), src_offset, what)
    _pwrite_all(dst_fd, memoryview(buffer), dst_offset)
    return nbytes


@dataclass
class Chunk:
    """Rows [first_row, first_row + rows) of a streamed tensor."""

    item: PlannedTensor
    source: TensorSource
    deltas: list[LoraDelta]
    patches: list[RowPatch]
    first_row: int
    rows: int
    row_bytes: int
    out_fd: int
    out_offset: int  # where the tensor starts in the output file

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def _chunks(
    item: PlannedTensor,
    source: TensorSource,
    deltas: list[LoraDelta],
    patches: list[RowPatch],
    out_fd: int,
    out_offset: int,
):
    rows = item.shape[0]
    row_bytes = item.nbytes // max(1, rows)
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
    for first in range(0, rows, step):
        yield Chunk(item, source, deltas, patches, first, min(step, rows - first), row_bytes, out_fd, out_offset)


def _shard_groups(planned: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in planned:
        if groups[-1] and size + item.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def _header_bytes(group: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in group:
        header[item.name] = {
            "dtype": item.dtype,
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def _write_shards(
    tmp_dir: Path,
    names: list[str],
    groups: list[list[PlannedTensor]],
    base: Checkpoint,
    adapters: list[Adapter],
    total_bytes: int,
    log: Log,
    report: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """Write every output shard into tmp_dir; returns the weight map (tensor name -> file name).

    Each tensor goes one of three ways. Bytes no adapter changes are copied file to file inside
    the kernel (copy_file_range), in a thread of their own. Tensors that LoRA changes in place
    are streamed in row chunks through a few reused buffers: a thread reads the next chunks while
    this thread merges one and another thread writes the previous ones, each at its final offset
    (the header fixed every offset in advance). Tensors whose dtype changes (--dtype) are merged
    whole in memory. Each file is fsynced once, at the end."""
    weight_map: dict[str, str] = {}
    raw_copies: list[list] = []  # [src_fd, out_fd, nbytes, src_offset, out_offset, what]
    streamed: list[tuple[PlannedTensor, TensorSource, int, int]] = []
    whole: list[tuple[PlannedTensor, int, int]] = []
    with ExitStack() as stack:
        in_fds: dict[Path, int] = {}

        def in_fd(path: Path) -> int:
            if path not in in_fds:
                in_fds[path] = os.open(path, os.O_RDONLY)
                stack.callback(os.close, in_fds[path])
            return in_fds[path]

        out_fds = []
        for file_name, group in zip(names, groups):
            out_fd = os.open(tmp_dir / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            stack.callback(os.close, out_fd)
            out_fds.append(out_fd)
            header = _header_bytes(group)
            _pwrite_all(out_fd, memoryview(header), 0)
            offset = len(header)
            for item in group:
                weight_map[item.name] = file_name
                source = tensor_source(item, base, adapters)
                entry = source.file.tensors[source.key]
                unchanged_layout = entry.dtype == item.dtype and tuple(entry.shape) == item.shape
                # token rows may grow a matrix: its rows stream, the grown ones come from the adapter
                row_layout = (
                    entry.dtype == item.dtype
                    and len(item.shape) == 2
                    and tuple(entry.shape[1:]) == item.shape[1:]
                    and entry.shape[0] <= item.shape[0]
                )
                if unchanged_layout and not source.loras and not source.token_rows:
                    src_fd = in_fd(source.file.path)
                    last = raw_copies[-1] if raw_copies else None
                    if (
                        last
                        and last[0] == src_fd
                        and last[1] == out_fd
                        and last[3] + last[2] == entry.start
                        and last[4] + last[2] == offset
                    ):
                        last[2] += item.nbytes  # neighbours in both files: one copy
                    else:
                        raw_copies.append([src_fd, out_fd, item.nbytes, entry.start, offset, str(source.file.path)])
                elif row_layout and item.dtype in _FLOAT_CODES:
                    streamed.append((item, source, out_fd, offset))
                else:
                    whole.append((item, out_fd, offset))
                offset += item.nbytes

        flusher = Flusher()
        stack.callback(flusher.close)  # runs before the files are closed

        def copy(src_fd: int, out_fd: int, nbytes: int, src_offset: int, out_offset: int, what: str) -> None:
            _copy_range(src_fd, out_fd, nbytes, src_offset, out_offset, what)
            flusher.start(out_fd, out_offset, nbytes)

        with (
            ThreadPoolExecutor(1, thread_name_prefix="chla-merge-copy") as copier,
            ThreadPoolExecutor(2, thread_name_prefix="chla-merge-io") as io_pool,
        ):
            copies = [copier.submit(copy, *job) for job in raw_copies]
            import torch  # the copies run meanwhile

            # One torch thread: the arithmetic comes in cache-sized blocks, too small to share
            # out, and OpenMP threads that spin while the I/O threads want the same cores made a
            # merge 50 times slower on a busy 2-core machine (measured).
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                progress = _Progress(total_bytes, log, report)
                scratch = Scratch()
                for item, out_fd, offset in whole:
                    tensor = merged_tensor(item, base, adapters, scratch)
                    if tuple(tensor.shape) != item.shape or tensor.dtype != torch_dtype(item.dtype):
                        raise RuntimeError(
                            f"bug: {item.name} came out {tensor.dtype} {tuple(tensor.shape)}, "
                            f"planned {item.dtype} {item.shape}"
                        )
                    _pwrite_all(out_fd, tensor.reshape(-1).view(torch.uint8).numpy().data, offset)
                    flusher.start(out_fd, offset, item.nbytes)
                    progress.add(item.nbytes)
                    del tensor
                _stream_chunks(streamed, in_fd, io_pool, flusher, scratch, progress)
                for pending in copies:
                    pending.result()
                flusher.close()
                for out_fd in out_fds:
                    os.fsync(out_fd)
            finally:
                torch.set_num_threads(threads)
    return weight_map


class _Progress:
    def __init__(self, total_bytes: int, log: Log, report: Callable[[int], None] | None = None) -> None:
        self.total, self.done, self.log, self.last = total_bytes, 0, log, time.monotonic()
        self.report = report  # merged bytes so far, for the live bars (chla_launcher.progress)

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.report is not None:
            self.report(self.done)
        if time.monotonic() - self.last > 10:
            self.log(f"merge: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB merged")
            self.last = time.monotonic()


def _stream_chunks(
    streamed, in_fd, io_pool: ThreadPoolExecutor, flusher: Flusher, scratch: Scratch, progress: _Progress
) -> None:
    """Read, merge and write every chunk of the streamed tensors, pipelined over a ring of buffers."""
    import torch

    def chunk_list():
        for item, source, out_fd, offset in streamed:
            deltas = [load_lora(adapter, lora) for adapter, lora in source.loras]
            patches = [load_row_patch(adapter, rows, torch_dtype(item.dtype)) for adapter, rows in source.token_rows]
            yield from _chunks(item, source, deltas, patches, out_fd, offset)

    chunks = chunk_list()
    buffers = [torch.empty(_CHUNK_BYTES, dtype=torch.uint8) for _ in range(_CHUNK_BUFFERS)]
    writes: list[Future | None] = [None] * _CHUNK_BUFFERS
    reads: deque[tuple[Chunk, int, Future]] = deque()
    count = 0

    def read(chunk: Chunk, slot: int, fd: int) -> None:
        src = chunk.source
        entry = src.file.tensors[src.key]
        stored = max(0, min(chunk.rows, entry.shape[0] - chunk.first_row)) * chunk.row_bytes
        view = buffers[slot].numpy().data[: chunk.nbytes]
        _pread_into(
            fd, view[:stored], entry.start + chunk.first_row * chunk.row_bytes, f"{src.file.path} (tensor {src.key})"
        )
        if stored < chunk.nbytes:  # rows the token rows grow the matrix by: every one is patched
            buffers[slot][stored : chunk.nbytes].zero_()

    def write(chunk: Chunk, slot: int) -> None:
        offset = chunk.out_offset + chunk.first_row * chunk.row_bytes
        _pwrite_all(chunk.out_fd, buffers[slot].numpy().data[: chunk.nbytes], offset)
        flusher.start(chunk.out_fd, offset, chunk.nbytes)

    def start_read() -> bool:
        nonlocal count
        chunk = next(chunks, None)
        if chunk is None:
            return False
        slot = count % _CHUNK_BUFFERS
        count += 1
        last_write = writes[slot]
        if last_write is not None:
            last_write.result()  # the buffer is free once its last chunk is written
            writes[slot] = None
        if buffers[slot].numel() < chunk.nbytes:  # one row larger than a chunk
            buffers[slot] = torch.empty(chunk.nbytes, dtype=torch.uint8)
        reads.append((chunk, slot, io_pool.submit(read, chunk, slot, in_fd(chunk.source.file.path))))
        return True

    for _ in range(_READ_AHEAD):
        start_read()
    while reads:
        chunk, slot, pending = reads.popleft()
        pending.result()
        start_read()
        rows = buffers[slot][: chunk.nbytes].view(torch_dtype(chunk.item.dtype)).view(chunk.rows, *chunk.item.shape[1:])
        apply_loras(rows, chunk.first_row, chunk.deltas, scratch)
        apply_row_patches(rows, chunk.first_row, chunk.patches)
        writes[slot] = io_pool.submit(write, chunk, slot)
        progress.add(chunk.nbytes)
    for last_write in writes:
        if last_write is not None:
            last_write.result()


def merge_adapters(
    base_dir: str | os.PathLike,
    adapter_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    shard_size: str | int = "5GB",
    dtype: str | None = None,
    log: Log = print,
    progress: Callable[..., None] | None = None,
) -> dict:
    """Merge `adapter_dirs` (in order) into the model at `base_dir`; write an HF model to `out_dir`.

    Returns a summary (tensors, bytes, shards, vocab size, seconds). `progress(done, total=...)` is
    told the merged bytes as they are written.
    """
    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    shard_bytes = parse_size(shard_size)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ChlaError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    out_dtype = DTYPE_NAMES[dtype] if dtype else None

    base = Checkpoint(base_dir)
    adapters = [load_adapter(Path(d)) for d in adapter_dirs]
    planned, keep_tied = plan_merge(base, adapters, out_dtype)
    tokenizer_dir = next((a.dir for a in reversed(adapters) if a.has_tokenizer), None)
    if tokenizer_dir is None and _has_tokenizer(base_dir):
        tokenizer_dir = base_dir
    if tokenizer_dir is None:
        raise ChlaError(
            f"no tokenizer in base {base_dir} or in any adapter; copy the tokenizer files "
            "(tokenizer.model, tokenizer_config.json, ...) into the last adapter's directory"
        )

    vocab_rows = next((p.shape[0] for p in planned if p.name == EMBED_KEY), base.config.get("vocab_size"))
    _check_tokenizer(tokenizer_dir, vocab_rows)

    groups = _shard_groups(planned, shard_bytes)
    total_bytes = sum(item.nbytes for item in planned)
    log(
        f"merge: {len(adapters)} adapter(s) into {base_dir}: {len(planned)} tensors, "
        f"{total_bytes / 1e9:.2f} GB in {len(groups)} shard(s), vocabulary {vocab_rows}"
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = (
            ["model.safetensors"]
            if len(groups) == 1
            else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        )
        report = (lambda done: progress(done, total=total_bytes)) if progress else None
        weight_map = _write_shards(tmp_dir, names, groups, base, adapters, total_bytes, log, report)
        if progress is not None:
            progress(total_bytes, total=total_bytes)
        if len(groups) > 1:
            _write_json(
                tmp_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total_bytes}, "weight_map": weight_map},
            )

        config = dict(base.config)
        config["vocab_size"] = vocab_rows
        if config.get("tie_word_embeddings") and not keep_tied:
            config["tie_word_embeddings"] = False
        if out_dtype is not None:
            config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = _CONFIG_DTYPE[
                out_dtype
            ]
        _write_json(tmp_dir / "config.json", config)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp_dir / "generation_config.json")
        for file_name in TOKENIZER_FILES:
            if (tokenizer_dir / file_name).is_file():
                shutil.copy2(tokenizer_dir / file_name, tmp_dir / file_name)
        make_portable(tmp_dir)  # an adapter saved by transformers 5 elsewhere loads in 4 too
        _write_json(
            tmp_dir / "chla_merge.json",
            {
                "base": str(base_dir),
                "adapters": [str(a.dir) for a in adapters],
                "tokenizer_from": str(tokenizer_dir),
                "dtype": dtype,
                "shard_size": shard_bytes,
            },
        )
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log(f"merge: wrote {out_dir} ({total_bytes / 1e9:.2f} GB, {len(groups)} shard(s)) in {seconds:.1f} s")
    return {
        "tensors": len(planned),
        "bytes": total_bytes,
        "shards": len(groups),
        "vocab_size": vocab_rows,
        "tied_embeddings": keep_tied,
        "tokenizer_from": str(tokenizer_dir),
        "seconds": round(seconds, 2),
    }


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() and (
        (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file()
    )


def tokenizer_size(tokenizer_dir: Path) -> int:
    """len(AutoTokenizer.from_pretrained(dir)), read without importing transformers (which would
    add ~100 MB and seconds to a merge): tokenizer.json through `tokenizers`, else the
    SentencePiece model plus the added tokens listed in tokenizer_config.json / added_tokens.json."""
    try:
        if (tokenizer_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        import sentencepiece

        ids = set(
            range(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).vocab_size())
        )
        decoder = _read_json(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        ids.update(int(i) for i in decoder)
        if (tokenizer_dir / "added_tokens.json").is_file():
            ids.update(int(i) for i in _read_json(tokenizer_dir / "added_tokens.json").values())
        return len(ids)
    except ChlaError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file can fail in many ways
        raise ChlaError(
            f"tokenizer in {tokenizer_dir} does not load ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); fix or replace its files"
        ) from None


def _check_tokenizer(tokenizer_dir: Path, vocab_rows: int | None) -> None:
    size = tokenizer_size(tokenizer_dir)
    if vocab_rows is not None and size > vocab_rows:
        raise ChlaError(
            f"tokenizer in {tokenizer_dir} has {size} tokens but the merged model has "
            f"{vocab_rows} embedding rows; the adapter that added tokens must save embed_tokens "
            "and lm_head (modules_to_save)"
        )


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ChlaError(f"{path}: unreadable JSON ({err})") from None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- stage runner ------------------------------------------------------------------------------


def merge_with_params(
    params: MergeParams, out_dir: str | os.PathLike, log: Log = print, progress: Callable[..., None] | None = None
) -> dict:
    """`merge_adapters` as the stage kind's params describe it (`chla merge` and the stage)."""
    return merge_adapters(
        params.base,
        params.adapters,
        out_dir,
        shard_size=params.shard_size,
        dtype=params.dtype,
        log=log,
        progress=progress,
    )


def run(ctx: StageContext[MergeParams]) -> dict:
    """Entry of stage kind `merge` (chla_launcher.kinds.merge)."""
    progress = progress_writer(ctx, total=0, unit="bytes")
    summary = merge_with_params(ctx.params, ctx.out_dir, log=ctx.log, progress=progress.update if progress else None)
    if progress is not None:
        progress.close()
    return summary

"""Merge LoRA adapters into a base model in bounded memory (`chla merge`, stage kind `merge`).

The original project loaded the whole model into memory and called peft's merge_and_unload.
Here the base is streamed tensor by tensor: every tensor is read from its safetensors shard,
each adapter is applied in order (LoRA delta, or a full replacement for modules_to_save), and
the result is written straight into an output shard whose header was laid out in advance.
Peak memory is therefore one tensor being merged plus the adapters, whatever the model's size.

Why not `safe_open` for the data: pages of a memory-mapped file stay resident (and count in
RSS) for as long as the file is mapped, so reading a 10 GB shard through one mapping makes the
process hold 10 GB. Tensors are read with plain positioned reads into a buffer of their own
instead, and that buffer is dropped once the tensor has been written.

Names. peft saves a LoRA module as `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`
(`.lora_embedding_A` / `.lora_embedding_B` for an embedding), a modules_to_save module as
`base_model.model.<module>.weight` (peft >= 0.13; older versions wrote
`<module>.modules_to_save.<adapter>.weight`), and with `save_embedding_layers` the resized base
embedding of a LoRA-adapted embedding as `<module>.base_layer.weight`. All map to the base
tensor `<module>.weight`.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from chla_launcher.atomic import replace_dir
from chla_launcher.errors import ChlaError

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# safetensors dtype codes <-> torch dtypes.
_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_TORCH_TO_ST = {dtype: code for code, dtype in _ST_TO_TORCH.items()}
_CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")

Log = Callable[[str], None]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (HF's convention: GB = 10**9, GiB = 2**30); plain integers are bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ChlaError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise ChlaError(f"shard size {text!r} must be positive")
    return size


# --- reading safetensors without keeping a mapping ------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
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
            dtype = _ST_TO_TORCH.get(info.get("dtype"))
            if dtype is None:
                raise ChlaError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            self.tensors[name] = TensorEntry(dtype, tuple(info["shape"]), data_start + begin, end - begin)
            data_end = max(data_end, end)
        if data_start + data_end > size:
            raise ChlaError(
                f"{path}: truncated safetensors file: its header needs {data_start + data_end} bytes, "
                f"the file has {size}; re-copy or re-save it")

    def read(self, name: str) -> torch.Tensor:
        entry = self.tensors[name]
        buffer = np.empty(entry.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(entry.start)
            view, done = memoryview(buffer), 0
            while done < entry.nbytes:
                got = handle.readinto(view[done:])
                if not got:
                    raise ChlaError(f"{self.path}: truncated while reading tensor {name}; re-copy it")
                done += got
        return torch.from_numpy(buffer).view(entry.dtype).reshape(entry.shape)


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
                "re-save it with save_pretrained (safetensors is the default)")
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
class Adapter:
    dir: Path
    file: SafetensorsFile
    config: dict
    # base tensor name -> adapter tensor name that replaces it (modules_to_save, base_layer)
    replacements: dict[str, str] = field(default_factory=dict)
    loras: dict[str, LoraPair] = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return _has_tokenizer(self.dir)


def _pattern_value(patterns: dict, module: str, default):
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
    for unsupported in ("use_dora", "lora_bias", "trainable_token_indices", "layer_replication", "target_parameters"):
        if config.get(unsupported):
            raise ChlaError(f"adapter {adapter_dir}: adapter_config.json sets {unsupported}, which chla merge "
                            "does not support; merge it with peft merge_and_unload instead")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ChlaError(f"adapter {adapter_dir}: no adapter_model.safetensors; re-save it with "
                        "save_pretrained(safe_serialization=True)")
    adapter = Adapter(dir=adapter_dir, file=SafetensorsFile(weights), config=config)

    lora_parts: dict[str, dict[str, str]] = {}
    for key in adapter.file.tensors:
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        match = _LORA_KEY.match(name)
        if match:
            lora_parts.setdefault(match["module"], {})[match["part"]] = key
            continue
        # modules_to_save copies and saved base layers replace the base tensor
        name = re.sub(r"\.modules_to_save(\.[A-Za-z0-9_]+)?\.", ".", name)
        name = name.replace(".base_layer.", ".")
        if ".original_module." in name:
            continue
        adapter.replacements[name] = key

    use_rslora = bool(config.get("use_rslora"))
    for module, parts in lora_parts.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise ChlaError(f"adapter {adapter_dir}: {module} has only one of its LoRA A/B tensors; the adapter file is incomplete")
        rank = adapter.file.tensors[a_key].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        adapter.loras[f"{module}.weight"] = LoraPair(a_key, b_key, scale, bool(config.get("fan_in_fan_out")), embedding)
    return adapter


# --- planning: every shape is checked before a byte is written ---------------------------------

@dataclass
class PlannedTensor:
    name: str
    source: str  # base tensor it starts from
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def plan_merge(base: Checkpoint, adapters: list[Adapter], dtype: torch.dtype | None) -> tuple[list[PlannedTensor], bool]:
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
        hint = (f"this adapter was trained on a different base "
                f"(its base_model_name_or_path: {adapter.config.get('base_model_name_or_path')})")
        for name, key in adapter.replacements.items():
            if name not in shapes:
                raise ChlaError(f"adapter {adapter.dir}: tensor {key} has no counterpart {name} in base {base.dir}; {hint}")
            new, old = adapter.file.tensors[key].shape, shapes[name]
            if new != old:
                growable = name in vocab_keys and len(new) == 2 and new[1:] == old[1:]
                if not growable:
                    raise ChlaError(f"adapter {adapter.dir}: tensor {key} has shape {_fmt(new)} but the model's "
                                    f"{name} is {_fmt(old)}; {hint}")
                if new[0] < old[0]:
                    raise ChlaError(f"adapter {adapter.dir}: {key} has {new[0]} rows but the model already has "
                                    f"{old[0]} (vocabulary would shrink); apply adapters in training order "
                                    "(pretraining before SFT)")
            shapes[name] = new
            touched.add(name)
        for name, lora in adapter.loras.items():
            if name not in shapes:
                raise ChlaError(f"adapter {adapter.dir}: LoRA tensor {lora.a_key} has no counterpart {name} "
                                f"in base {base.dir}; {hint}")
            a_shape = adapter.file.tensors[lora.a_key].shape
            b_shape = adapter.file.tensors[lora.b_key].shape
            delta = (a_shape[1], b_shape[0]) if (lora.embedding or lora.fan_in_fan_out) else (b_shape[0], a_shape[1])
            if len(shapes[name]) != 2 or tuple(shapes[name]) != delta or a_shape[0] != b_shape[1]:
                raise ChlaError(f"adapter {adapter.dir}: LoRA tensors {lora.a_key} {_fmt(a_shape)} and "
                                f"{lora.b_key} {_fmt(b_shape)} do not fit the model's {name} "
                                f"{_fmt(shapes[name])}; {hint}")
            touched.add(name)

    keep_tied = tied and not (touched & vocab_keys) and sources.get(LM_HEAD_KEY) == EMBED_KEY
    if keep_tied:
        shapes.pop(LM_HEAD_KEY, None)
    if EMBED_KEY in shapes and LM_HEAD_KEY in shapes and shapes[EMBED_KEY][0] != shapes[LM_HEAD_KEY][0]:
        raise ChlaError(f"after the adapters, {EMBED_KEY} has {shapes[EMBED_KEY][0]} rows but {LM_HEAD_KEY} has "
                        f"{shapes[LM_HEAD_KEY][0]}; an adapter that grows the vocabulary must save both "
                        "(modules_to_save: [embed_tokens, lm_head])")
    planned = []
    for name, shape in shapes.items():
        source_dtype = base.entry(sources[name]).dtype
        out_dtype = dtype if (dtype is not None and source_dtype.is_floating_point) else source_dtype
        planned.append(PlannedTensor(name, sources[name], tuple(shape), out_dtype))
    return planned, keep_tied


# Largest fp32 block (elements) made while adding a LoRA delta to a half-precision weight:
# bounds the extra memory for huge matrices (a LoRA'd 49,953 x 4,096 embedding) while keeping
# ordinary ones in a single step (few large torch ops are much faster than many small ones).
_BLOCK_ELEMENTS = 32 * 2**20


class Workspace:
    """One fp32 scratch buffer reused for every LoRA delta: fresh allocations of that size are
    page-faulted in anew each time, which costs more than the arithmetic itself."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.float32)

    def fp32(self, shape: tuple[int, ...]) -> torch.Tensor:
        needed = math.prod(shape)
        if self.buffer.numel() < needed:
            self.buffer = torch.empty(0, dtype=torch.float32)  # drop the old one first
            self.buffer = torch.empty(needed, dtype=torch.float32)
        return self.buffer[:needed].view(shape)


def add_lora_delta(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                   workspace: Workspace) -> None:
    """weight += scale * left @ right, in place, computed in fp32."""
    if weight.dtype == torch.float32:
        weight.addmm_(left, right, alpha=scale)
        return
    rows = max(1, _BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        wide = workspace.fp32(tuple(block.shape))
        wide.copy_(block)
        wide.addmm_(left[start:start + rows], right, alpha=scale)
        block.copy_(wide)


def merged_tensor(item: PlannedTensor, base: Checkpoint, adapters: list[Adapter],
                  workspace: Workspace | None = None) -> torch.Tensor:
    """One output tensor: the base's, then every adapter in order."""
    workspace = workspace or Workspace()
    tensor = base.read(item.source)
    for adapter in adapters:
        key = adapter.replacements.get(item.name)
        if key is not None:
            tensor = adapter.file.read(key)
        lora = adapter.loras.get(item.name)
        if lora is not None:
            # work in the wider of the stored and the requested dtype
            if item.dtype.itemsize > tensor.dtype.itemsize:
                tensor = tensor.to(item.dtype)
            lora_a = adapter.file.read(lora.a_key).float()
            lora_b = adapter.file.read(lora.b_key).float()
            if lora.embedding or lora.fan_in_fan_out:
                add_lora_delta(tensor, lora_a.t(), lora_b.t(), lora.scale, workspace)  # (B @ A)^T
            else:
                add_lora_delta(tensor, lora_b, lora_a, lora.scale, workspace)
    return tensor.to(item.dtype).contiguous()


# --- writing shards whose headers are laid out before the data --------------------------------

# Bytes of merged tensors that may wait for the disk while the next one is merged. Overlapping
# the two hides most of the write time; a tensor larger than this is written alone.
_WRITE_BUDGET = 64 * 2**20


class BackgroundWriter:
    """Writes merged tensors to their shard file in a thread, so merging the next tensor overlaps
    the write. At most `budget` bytes (or one tensor) are held for writing at any time."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.pending: list[tuple] = []
        self.in_flight = 0
        self.error: BaseException | None = None
        self.closing = False
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="chla-merge-writer", daemon=True)
        self.thread.start()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        with self.condition:
            self.closing = True
            self.condition.notify_all()
        self.thread.join()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def wait_for_room(self, nbytes: int) -> None:
        with self.condition:
            while self.in_flight and self.in_flight + nbytes > self.budget and self.error is None:
                self.condition.wait()
            self._check()

    def put(self, handle, tensor: torch.Tensor) -> None:
        with self.condition:
            self._check()
            self.pending.append((handle, tensor))
            self.in_flight += tensor.nbytes
            self.condition.notify_all()

    def drain(self) -> None:
        with self.condition:
            while self.in_flight and self.error is None:
                self.condition.wait()
            self._check()

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and not self.closing:
                    self.condition.wait()
                if not self.pending:
                    return
                handle, tensor = self.pending.pop(0)
            try:
                data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                while data:
                    written = handle.write(data)
                    data = data[written:]
            except BaseException as err:  # noqa: BLE001 - handed to the merging thread
                with self.condition:
                    self.error = err
                    self.condition.notify_all()
                return
            with self.condition:
                self.in_flight -= tensor.nbytes
                del tensor, data
                self.condition.notify_all()


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
        header[item.name] = {"dtype": _TORCH_TO_ST[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def merge_adapters(base_dir: str | os.PathLike, adapter_dirs: list[str | os.PathLike], out_dir: str | os.PathLike,
                   shard_size: str | int = "5GB", dtype: str | None = None, log: Log = print) -> dict:
    """Merge `adapter_dirs` (in order) into the model at `base_dir`; write an HF model to `out_dir`.

    Returns a summary (tensors, bytes, shards, vocab size, seconds).
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
        raise ChlaError(f"no tokenizer in base {base_dir} or in any adapter; copy the tokenizer files "
                        "(tokenizer.model, tokenizer_config.json, ...) into the last adapter's directory")

    vocab_rows = next((p.shape[0] for p in planned if p.name == EMBED_KEY), base.config.get("vocab_size"))
    _check_tokenizer(tokenizer_dir, vocab_rows)

    groups = _shard_groups(planned, shard_bytes)
    total_bytes = sum(item.nbytes for item in planned)
    log(f"merge: {len(adapters)} adapter(s) into {base_dir}: {len(planned)} tensors, "
        f"{total_bytes / 1e9:.2f} GB in {len(groups)} shard(s), vocabulary {vocab_rows}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = (["model.safetensors"] if len(groups) == 1 else
                 [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        weight_map: dict[str, str] = {}
        done_bytes, last_report = 0, time.monotonic()
        workspace = Workspace()
        with BackgroundWriter(_WRITE_BUDGET) as writer:
            for file_name, group in zip(names, groups):
                with open(tmp_dir / file_name, "wb", buffering=0) as handle:
                    handle.write(_header_bytes(group))
                    for item in group:
                        writer.wait_for_room(item.nbytes)
                        tensor = merged_tensor(item, base, adapters, workspace)
                        if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
                            raise RuntimeError(f"bug: {item.name} came out {tensor.dtype} {tuple(tensor.shape)}, "
                                               f"planned {item.dtype} {item.shape}")
                        writer.put(handle, tensor)
                        del tensor
                        weight_map[item.name] = file_name
                        done_bytes += item.nbytes
                        if time.monotonic() - last_report > 10:
                            log(f"merge: {done_bytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB merged")
                            last_report = time.monotonic()
                    writer.drain()
                    os.fsync(handle.fileno())
        if len(groups) > 1:
            _write_json(tmp_dir / "model.safetensors.index.json",
                        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map})

        config = dict(base.config)
        config["vocab_size"] = vocab_rows
        if config.get("tie_word_embeddings") and not keep_tied:
            config["tie_word_embeddings"] = False
        if out_dtype is not None:
            config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = _CONFIG_DTYPE[out_dtype]
        _write_json(tmp_dir / "config.json", config)
        if (base_dir / "generation_config.json").is_file():
            shutil.copy2(base_dir / "generation_config.json", tmp_dir / "generation_config.json")
        for file_name in TOKENIZER_FILES:
            if (tokenizer_dir / file_name).is_file():
                shutil.copy2(tokenizer_dir / file_name, tmp_dir / file_name)
        _write_json(tmp_dir / "chla_merge.json", {
            "base": str(base_dir), "adapters": [str(a.dir) for a in adapters],
            "tokenizer_from": str(tokenizer_dir), "dtype": dtype, "shard_size": shard_bytes})
        replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log(f"merge: wrote {out_dir} ({total_bytes / 1e9:.2f} GB, {len(groups)} shard(s)) in {seconds:.1f} s")
    return {"tensors": len(planned), "bytes": total_bytes, "shards": len(groups), "vocab_size": vocab_rows,
            "tied_embeddings": keep_tied, "tokenizer_from": str(tokenizer_dir), "seconds": round(seconds, 2)}


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() and (
        (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file())


def tokenizer_size(tokenizer_dir: Path) -> int:
    """len(AutoTokenizer.from_pretrained(dir)), read without importing transformers (which would
    add ~100 MB and seconds to a merge): tokenizer.json through `tokenizers`, else the
    SentencePiece model plus the added tokens listed in tokenizer_config.json / added_tokens.json."""
    try:
        if (tokenizer_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
        import sentencepiece

        ids = set(range(sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model")).vocab_size()))
        decoder = _read_json(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        ids.update(int(i) for i in decoder)
        if (tokenizer_dir / "added_tokens.json").is_file():
            ids.update(int(i) for i in _read_json(tokenizer_dir / "added_tokens.json").values())
        return len(ids)
    except ChlaError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt file can fail in many ways
        raise ChlaError(f"tokenizer in {tokenizer_dir} does not load ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); fix or replace its files") from None


def _check_tokenizer(tokenizer_dir: Path, vocab_rows: int | None) -> None:
    size = tokenizer_size(tokenizer_dir)
    if vocab_rows is not None and size > vocab_rows:
        raise ChlaError(f"tokenizer in {tokenizer_dir} has {size} tokens but the merged model has "
                        f"{vocab_rows} embedding rows; the adapter that added tokens must save embed_tokens "
                        "and lm_head (modules_to_save)")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise ChlaError(f"{path}: unreadable JSON ({err})") from None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- stage runner ------------------------------------------------------------------------------

def run(ctx) -> dict:
    """Entry of stage kind `merge` (chla_launcher.kinds.merge)."""
    params = ctx.params
    return merge_adapters(params.base, params.adapters, ctx.out_dir, shard_size=params.shard_size,
                          dtype=params.dtype, log=ctx.log)

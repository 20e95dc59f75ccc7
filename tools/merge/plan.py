"""The merge's plan: every output tensor's shape and dtype, checked against the base and the
adapters before a byte is written, and its layout in the output shards."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from chla_launcher.contract.errors import ChlaError

from .adapters import Adapter
from .checkpoint import FLOAT_CODES, ITEMSIZE, Checkpoint

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


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


@dataclass
class PlannedTensor:
    name: str
    source: str  # base tensor it starts from
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


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
    tied_now = tied and sources.get(LM_HEAD_KEY) == EMBED_KEY

    for adapter in adapters:
        hint = (
            f"this adapter was trained on a different base "
            f"(its base_model_name_or_path: {adapter.config.get('base_model_name_or_path')})"
        )
        if tied_now and vocab_keys & {*adapter.replacements, *adapter.loras, *adapter.token_rows}:
            if keeps_tie(adapter):
                mirror_embedding_to_head(adapter)
            else:
                tied_now = False
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

    keep_tied = tied_now
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
        out_dtype = dtype if (dtype is not None and source_dtype in FLOAT_CODES) else source_dtype
        planned.append(PlannedTensor(name, sources[name], tuple(shape), out_dtype))
    return planned, keep_tied


def keeps_tie(adapter: Adapter) -> bool:
    """Whether stock peft keeps a tied base's embeddings tied under this adapter, which changes
    them: with ensure_weight_tying (lm_head's copy or token rows are the embedding's), or with
    trainable token rows of the input embedding and none of lm_head's own (peft ties the head's
    rows to the embedding's when their indices agree). A modules_to_save copy or a LoRA of one
    of the two without ensure_weight_tying makes the head a matrix of its own."""
    if adapter.config.get("ensure_weight_tying"):
        return True
    if {*adapter.replacements, *adapter.loras} & {EMBED_KEY, LM_HEAD_KEY}:
        return False
    embed, head = adapter.token_rows.get(EMBED_KEY), adapter.token_rows.get(LM_HEAD_KEY)
    return embed is not None and (head is None or head.indices == embed.indices)


def mirror_embedding_to_head(adapter: Adapter) -> None:
    """A tied adapter changes the one matrix through the input embedding: lm_head gets the same
    replacement and rows (written only if a later adapter unties the two; else lm_head is not
    a tensor of the merged model)."""
    if EMBED_KEY in adapter.loras or LM_HEAD_KEY in adapter.loras:
        raise ChlaError(
            f"adapter {adapter.dir}: a LoRA on the tied embedding matrix (ensure_weight_tying), which "
            "chla merge does not merge; merge it with peft merge_and_unload instead"
        )
    adapter.replacements.pop(LM_HEAD_KEY, None)
    adapter.token_rows.pop(LM_HEAD_KEY, None)
    if EMBED_KEY in adapter.replacements:
        adapter.replacements[LM_HEAD_KEY] = adapter.replacements[EMBED_KEY]
    if EMBED_KEY in adapter.token_rows:
        adapter.token_rows[LM_HEAD_KEY] = adapter.token_rows[EMBED_KEY]


def shard_groups(planned: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in planned:
        if groups[-1] and size + item.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.nbytes
    return groups


def header_bytes(group: list[PlannedTensor]) -> bytes:
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
